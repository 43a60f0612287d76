"""Keys, key files and crypto suites: the only package that imports ``cryptography.hazmat``."""
