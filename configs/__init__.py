"""Cluster profiles and example job files (installed as hpcinfer.configs)."""
