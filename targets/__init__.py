"""Device descriptions, one TOML file per target; loaded by :mod:`edgekit.target`."""
