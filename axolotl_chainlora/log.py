"""The package's one logger, and the import-time notices of others that it hides.

The logger is named under axolotl's integrations, as theirs are (`axolotl.integrations.<name>`):
axolotl prints INFO lines of its own loggers and hides those of others. It is plain `logging`, so
that the PEFT and COLA parts log the same way without axolotl installed.
"""

import contextlib
import logging
import warnings

LOG = logging.getLogger("axolotl.integrations.chainlora")

# import-time notices that say nothing to a user of this package: bitsandbytes' lookup of an optional CPU
# kernel on the Hugging Face hub (through `kernels`), torchao's optional CUDA extensions failing to load on
# a CPU build of torch, torch's pytree deprecation notes about torchao's enums
IMPORT_NOTICE_LOGGERS = ("bitsandbytes", "kernels", "torchao", "torch.utils._pytree")


@contextlib.contextmanager
def third_party_import_notices_hidden():
    """Hide the warnings of IMPORT_NOTICE_LOGGERS and Python warnings while the package imports its
    dependencies; errors still show."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOTICE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
