"""Generated demo data (synthetic heads and a labeled task) and the sanity measures used on it."""
