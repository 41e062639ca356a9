"""The top-level Python API names resolve to the API's functions, not to submodules."""


def test_top_level_api_names():
    import ueo.adaptation  # noqa: F401  (a submodule import must not shadow `ueo.adapt`)
    from ueo import AdaptConfig, adapt, evaluate, load_model, predict, save_run

    assert adapt is ueo.api.adapt and callable(adapt)
    assert (evaluate, load_model, predict, save_run) == (
        ueo.api.evaluate,
        ueo.api.load_model,
        ueo.api.predict,
        ueo.api.save_run,
    )
    assert AdaptConfig().epochs == 50
