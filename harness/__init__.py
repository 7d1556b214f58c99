"""Attack harnesses kept in the project, so anyone can re-measure the security figures.

Each harness is a module runnable on demand (``python -m harness.<name> --help``) and has a
bounded smoke run that CI executes as an ordinary test (``tests/test_harness_<name>.py``).
Every harness prints one JSON line of figures: ``tried``, ``wrongly_accepted``, ``executed``,
``untyped`` and ``hangs``; the README's "Security" section records the latest ones.

Planned modules, not written yet: ``pickle_corpus`` (hostile pickles with a live-payload
control), ``fuzz`` (manifest reader, safetensors header, tar reader, pickle scanner; atheris on
demand, hypothesis in CI), ``crash`` (kill -9 at random and injected points), ``corruption``
(byte flips and truncations over every region). Until they land, the regression tests in
``tests/`` (``test_torch_pickle.py``, ``test_special_files.py``, ``test_jsonio.py``,
``test_commit.py``, ``test_binding.py``) hold the cases the adversarial review found.
"""
