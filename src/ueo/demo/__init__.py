"""The offline demo: a bundled tiny CLIP adapted on the universal-shift testbed.

`ueo.demo.testbed` builds the testbed, `ueo.demo.zoo` holds the bundled tiny models (and
registers them with the core through the `ueo.models` entry point), `ueo.demo.runner` runs
`ueo bench`'s machinery over the testbed and draws its figures.
"""

BUNDLED_MODELS = ("ueo-tiny-rn", "ueo-tiny-vit")  # torch-free, for the command line's choices
