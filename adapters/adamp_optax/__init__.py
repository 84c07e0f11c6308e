"""adamp_optax (work in progress)."""
