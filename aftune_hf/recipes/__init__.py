"""Built-in recipes. A recipe builds the model, ``TrainingArguments``, dataset and collator
from a :class:`~aftune_hf.contract.Contract`; provider and verifier call the same one."""
