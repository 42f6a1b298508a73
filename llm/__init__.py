"""The listen-while-speaking dialogue LM (attention-sink cache, batched decode engine)."""

from duplex.requirements import require

require("torch", "transformers")
