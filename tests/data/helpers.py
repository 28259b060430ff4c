SMALL_BUDGET = 60_000  # bytes per domain: enough documents per domain for a split, built in about a second
