"""Files: the one atomic writer, line-numbered text reading, and finding third-party data on disk."""
