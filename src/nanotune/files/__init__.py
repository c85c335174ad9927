"""Reading and writing files, for every part: `read` turns any broken file into one clear error
naming it, `atomic` makes every artifact appear whole or not at all. Knows no format beyond
JSON, YAML, safetensors and weights-only pickles."""
