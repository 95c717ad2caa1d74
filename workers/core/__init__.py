"""Settings, PHI-safe logging, UID generation and site plugins: what every layer uses."""
