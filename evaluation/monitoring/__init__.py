"""Production monitoring: the regression ledger, traffic drift and the cost model (pure cores)."""
