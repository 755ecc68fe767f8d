"""The shipped presets as package data: `demo.toml` (the embedded CPU default) and `paper.toml`
(the papers' setting). `eval.presets` reads them."""
