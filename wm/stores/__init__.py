"""The stores: persistence of the domain's models on MongoDB (unique keys, indexes, by-`_id` reads).

Each implements ports of `wm.ports` structurally; a store persists, it does not decide what happens next.
"""
