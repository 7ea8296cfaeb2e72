"""Sources of raw Userpilot events: the demo generator, local export files, the Export API."""

from userpilot_sync.source.base import EventSource, Extraction, ExtractRequest, SourceBatch

__all__ = ["EventSource", "Extraction", "ExtractRequest", "SourceBatch"]
