"""Operations that span stores, engines and the bus outside a consumer's delivery: the durable
quiet-period timers that close buckets, and an operator's job retry.
"""
