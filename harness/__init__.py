"""Attack harnesses kept in the project, so anyone can re-measure the security figures.

Each harness is a module runnable on demand (``python -m harness.<name> --help``) and has a
bounded smoke run that CI executes as an ordinary test (``tests/test_harness.py``).
Every harness prints one JSON line of figures (always ``harness`` and ``tried``) and exits 1 when
it found a failure; the README's "Security" section records the latest ones.

Modules: ``crash`` (kill -9 at instrumented and random points during save, pack, convert, unpack;
figures ``kills``, ``broken``, ``recovery_failures``), ``pickles`` (hostile pickles with a
live-payload control; ``hostile`` holds the opcode builders the tests share), ``corrupt``
(byte flips and truncations over every region of directories and archives); ``child`` runs one
case in a forked child with a timeout, ``concurrency`` (racing writers and a reader on one
path), ``fuzz`` (hypothesis fuzz targets for the manifest reader, safetensors header parser,
tar reader and pickle scanner). The regression tests in ``tests/`` hold every case they found.
"""
