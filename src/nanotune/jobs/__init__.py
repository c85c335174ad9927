"""The workflows that wire the parts: fine-tune, evaluate, demo (and what they share: prepare).

Each job is a plain function over the parts (models, weights, methods, data, training, eval);
`artifacts` alone decides what a run writes to `final/` (with its model card, `card`) and how
nanotune outputs are loaded back.
"""
