"""The one exception type a user is meant to see: the CLI prints its message as one line."""


class LNMError(Exception):
    """A problem with the user's input or setup. The message names the file and what to fix."""


class DatasetProblems(LNMError):
    """Several problems found while verifying a dataset; each is one line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) found in the dataset:\n" + "\n".join(self.problems))
