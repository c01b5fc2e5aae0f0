"""Development and demo helpers, not part of the installed package: the offline assets the tests
and the demo use (``assets.py``: tokenizers, corpora and SmolLM2 from package registries), the
demo data blend (``demo_data.py``) and the Austen retrieval preference demo
(``demo_preference.py``, ``make_preference_demo.py``)."""
