"""Solvers: fixed-grid RK (``fixed``), adaptive Dormand-Prince (``adaptive``), the Bespoke
scale-time family (``bespoke``) and non-stationary BNS solvers (``bns``)."""
