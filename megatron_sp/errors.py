"""The errors a user reads: each is one line, printed by pretrain_gpt.py as `error: <message>` (exit 2)."""


class ConfigError(ValueError):
    """An impossible configuration; its message is one line for the user. The ranks of a node find the
    same one, so the node's first rank says it."""


class RankError(ConfigError):
    """A problem one rank may find and others not (e.g. in the samples it reads): that rank says it, unless
    `echoed` (the same sample read by another rank of its sequence-parallel group, which says it)."""

    def __init__(self, message: str, echoed: bool = False):
        super().__init__(message)
        self.echoed = echoed
