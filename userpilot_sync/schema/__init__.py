"""The Userpilot Event Schema: column definitions, Arrow schemas and pandera schemas."""

from userpilot_sync.schema.events import (
    EVENT_COLUMNS,
    EVENT_TYPES,
    INTERACTION_COLUMNS,
    KNOWN_SOURCES,
    KNOWN_INTERACTION_STATUSES,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    Column,
    export_arrow_schema,
    export_columns,
    staged_arrow_schema,
)

__all__ = [
    "EVENT_COLUMNS",
    "EVENT_TYPES",
    "INTERACTION_COLUMNS",
    "KNOWN_SOURCES",
    "KNOWN_INTERACTION_STATUSES",
    "REQUIRED_COLUMNS",
    "SCHEMA_VERSION",
    "Column",
    "export_arrow_schema",
    "export_columns",
    "staged_arrow_schema",
]
