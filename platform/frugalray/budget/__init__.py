"""Budget core: FLOP accounting (`flops`) and the compute ledger every stage writes (`ledger`)."""
