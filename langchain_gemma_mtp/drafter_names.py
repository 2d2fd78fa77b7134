"""The drafter names every layer accepts, kept free of torch so the command line can list them in --help."""

DRAFTER_NAMES = ("auto", "mtp", "hybrid", "draft_model", "ngram", "none")
