"""The ops of :mod:`adaexit.kernels`, one module per op: ``exit_gate``, ``partition``, ``gather_rows``,
``scatter_rows`` and ``compact``.

Each module holds the op's ``@triton.jit`` kernel(s), the host wrapper, the ``<op>_torch`` reference with the
same signature and ``COMPILE_SPECS``. Nothing is re-exported here, so ``adaexit.kernels.ops.<op>`` is always
the module; the public functions are imported from :mod:`adaexit.kernels`.
"""
