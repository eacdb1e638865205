"""The conversation-log contract: the single source of truth for schema and row rules."""
