"""Python config files: each defines get_config()."""
