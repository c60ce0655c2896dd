"""A synthetic multi-speaker corpus (source-filter voices, session channels, noise, rooms) for demos and tests."""
