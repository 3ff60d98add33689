"""`msaflow segment ROOT`: long videos -> utterances from recognised speech -> ROOT/segments.csv
(the segments layout `msaflow manifest` reads). See msaflow.datasets.speech_segments."""

from msaflow.datasets.speech_segments import add_arguments, main  # noqa: F401
