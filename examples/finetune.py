"""Fine-tune a causal LM with LoRA the usual Hugging Face way; add `--layer_streaming` when it does not fit the GPU.

An ordinary Trainer script: `HfArgumentParser` over the script's arguments and `OffloadTrainingArguments` (which is
`TrainingArguments` plus the layer-streaming options), a `datasets` dataset, `OffloadTrainer`. Without
`--layer_streaming` it trains exactly like `Trainer`. It runs offline with nothing but an output directory: the
default model is a tiny Llama that hf_offload builds locally, and the default dataset is bundled with hf_offload.

    python examples/finetune.py --output_dir out --lora                  # an ordinary LoRA fine-tune
    python examples/finetune.py --output_dir out --layer_streaming       # the same, layers streamed from host memory
    python examples/finetune.py --output_dir out --layer_streaming \\
        --model_name_or_path Qwen/Qwen2.5-7B --dataset_name ./my_texts.jsonl --bf16 --push_to_hub

`--dataset_name` is a Hub dataset id or a local .json/.jsonl/.csv/.parquet/.txt file with a text column.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# hf_offload first: importing it quiets a line bitsandbytes logs when transformers imports it (about an optional
# CPU kernel that plays no part here).
from hf_offload import HostStoreConfig, OffloadTrainer, OffloadTrainingArguments  # isort: skip

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    set_seed,
)

from hf_offload.demo import import_datasets

datasets = import_datasets()  # an extra: the hf_offload package itself does not need it


LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A Hub model id or a local path. Default: hf_offload's tiny Llama, built in ./tiny-llama."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset id or a local data file. Default: the dataset bundled with hf_offload."},
    )
    text_column: str = field(default="text", metadata={"help": "The dataset column that holds the text."})
    max_length: int = field(default=64, metadata={"help": "Tokens per example (longer texts are truncated)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of the examples held out for evaluation."})
    lora: bool = field(
        default=False,
        metadata={
            "help": "Add LoRA adapters in the script (peft), as an ordinary LoRA run does, with the "
            "--offload_lora_* settings. --layer_streaming adds them by itself when the model has none."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype to load: float32, bfloat16 or float16."})


def load_texts(args: ScriptArguments) -> datasets.Dataset:
    if args.dataset_name is None:
        from hf_offload.demo import DATASET

        return datasets.load_dataset("json", data_files=str(DATASET), split="train")
    suffix = os.path.splitext(args.dataset_name)[1]
    if os.path.isfile(args.dataset_name) and suffix in LOCAL_FORMATS:
        return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=args.dataset_name, split="train")
    return datasets.load_dataset(args.dataset_name, split="train")


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, OffloadTrainingArguments))
    # A LoRA learning rate by default (LoRA usually trains at 1e-4 to 3e-4); the Trainer's 5e-5 is a full
    # fine-tuning rate. --learning_rate still chooses.
    parser.set_defaults(learning_rate=2e-4)
    script_args, training_args = parser.parse_args_into_dataclasses()
    if not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin for; torch would warn on every dataloader
    set_seed(training_args.seed)

    model_path = script_args.model_name_or_path
    if model_path is None:
        from hf_offload.demo import tiny_checkpoint

        model_path = str(tiny_checkpoint("tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # With --layer_streaming, the decoder layers load straight into the host store (in the store's dtype, one
    # tensor at a time), so host memory never holds the whole checkpoint.
    store = None
    if training_args.layer_streaming:
        store = HostStoreConfig(training_args.offload_base_weight_dtype, store_cache=training_args.offload_store_cache)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, script_args.dtype), quantization_config=store
    )

    texts = load_texts(script_args)
    tokenized = texts.map(
        lambda batch: tokenizer(batch[script_args.text_column], truncation=True, max_length=script_args.max_length),
        batched=True,
        remove_columns=texts.column_names,
    )
    split = tokenized.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)

    if script_args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, training_args.lora_config())

    trainer = OffloadTrainer(
        model=model,
        args=training_args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("all", {**result.metrics, **metrics})
    trainer.save_state()
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if script_args.model_name_or_path is None and trainer.is_world_process_zero():
        print(NEXT_STEPS)


# Printed after a run on the embedded tiny model: where a first run usually goes next.
NEXT_STEPS = """
What to try next:
  - a Hub model:   python examples/finetune.py --output_dir out --layer_streaming \\
                       --model_name_or_path Qwen/Qwen2.5-0.5B --dtype bfloat16 --bf16
  - will a big model fit? hf-offload plan meta-llama/Llama-3.1-70B --gpu_mem 80 --base_weight_dtype nf4
  - an unchanged script: hf-offload launch -- python your_train.py ...
  - the guides: docs/index.md
"""


if __name__ == "__main__":
    main()
