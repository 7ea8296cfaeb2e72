"""A local emulator of Userpilot's Bulk Data Export API (real HTTP on 127.0.0.1).

See ``server.py`` and docs/export_api.md. Run it standalone with
``python -m userpilot_sync.emulator --port 8765``.
"""

from userpilot_sync.emulator.server import App, ExportApiEmulator, Faults, RecordedRequest, write_chunk

__all__ = ["App", "ExportApiEmulator", "Faults", "RecordedRequest", "write_chunk"]
