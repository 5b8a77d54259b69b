"""The package's one logger, and the notices of other libraries that it hides.

The logger is named under axolotl's integrations, as theirs are (`axolotl.integrations.<name>`):
axolotl prints INFO lines of its own loggers and hides those of others. It is plain `logging`, so
that the PEFT and COLA parts log the same way without axolotl installed.
"""

import contextlib
import logging
import warnings

LOG = logging.getLogger("axolotl.integrations.chainlora")

# notices that say nothing to a user of this package: bitsandbytes' lookup of an optional CPU kernel on the
# Hugging Face hub (through `kernels`), torchao's optional CUDA extensions failing to load on a CPU build of torch,
# torch's pytree deprecation notes about torchao's enums, DeepSpeed's "Setting accelerator to CPU" on a machine
# without a GPU (transformers and accelerate import DeepSpeed when it is installed, e.g. in save_pretrained)
THIRD_PARTY_NOTICE_LOGGERS = ("bitsandbytes", "kernels", "torchao", "torch.utils._pytree", "DeepSpeed")


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def third_party_notices_hidden():
    """Hide the warnings of THIRD_PARTY_NOTICE_LOGGERS and Python warnings inside the block; errors still show.

    Used while the package imports its dependencies, and around a command of the `axolotl-chainlora` CLI.
    """
    errors_only = _ErrorsOnly()
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_NOTICE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)  # for their child loggers, which inherit it
        logger.addFilter(errors_only)  # for DeepSpeed's, which sets its own level when DeepSpeed first imports
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeFilter(errors_only)
            if logger.level == logging.ERROR:  # a library that set its own level meanwhile keeps it
                logger.setLevel(level)
