"""The workflows that wire the parts: fine-tune, evaluate, demo.

Each job is a plain function over the parts (models, weights, methods, data, training, eval);
`artifacts` alone decides what a run writes to `final/` and how nanotune outputs are loaded back.
"""
