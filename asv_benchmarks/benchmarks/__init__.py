"""asv benchmarks of adamp-xp (see asv.conf.json one folder up)."""
