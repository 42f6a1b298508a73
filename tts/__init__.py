"""The streaming codec-LM TTS (CSM on the Mimi codec, batched frame engine)."""

from duplex.requirements import require

require("torch", "transformers")
