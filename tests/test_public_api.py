import ngsd_guard


def test_public_names_are_pinned():
    assert sorted(ngsd_guard.__all__) == [
        "AlphaPolicy",
        "Assessment",
        "AsyncTokenStream",
        "BatchStream",
        "ConfigError",
        "ContextTooLongError",
        "DecodingConfig",
        "FixedAlpha",
        "GateConfig",
        "GateEvent",
        "GenerateOptions",
        "Generation",
        "GenerationRequest",
        "GuardConfig",
        "GuardedLM",
        "IncompatibleTokenizerError",
        "InterventionConfig",
        "ModelNotFoundError",
        "NGSDError",
        "PromptError",
        "StepRecord",
        "Summary",
        "TokenConstraint",
        "TokenStream",
    ]
    for name in ngsd_guard.__all__:
        assert getattr(ngsd_guard, name) is not None


def test_errors_share_one_base():
    for name in (
        "ConfigError",
        "PromptError",
        "ContextTooLongError",
        "ModelNotFoundError",
        "IncompatibleTokenizerError",
    ):
        assert issubclass(getattr(ngsd_guard, name), ngsd_guard.NGSDError)
