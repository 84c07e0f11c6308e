"""What the numba kernels report per tensor, and the range their float64 sums are trusted in: shared by
the kernels (:mod:`adamp_core.paths._numba_kernels`) and the host side (:mod:`adamp_core.paths.numba_fused`)."""

OK, SKIPPED, FALLBACK = 0, 1, 2  # kernel results: written; non-finite grad, nothing written; out of range
_BIG, _SMALL = 2.0**968, 2.0**-968  # float64 row sums of squares outside: the pure step's scaling
