"""massact-nn."""
