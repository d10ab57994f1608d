# Written by `python -m helpers xtuner export-config` from $record.
# The course's internlm2_1_8b_qlora_alpaca_e3 layout with this run's settings: `xtuner train THIS_FILE` repeats
# the kit's notebook 02 in XTuner. XTuner counts iterations (one batch each); the kit counts updates
# (accumulative_counts batches each), so every interval below is the kit's number x accumulative_counts.
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import (AutoModelForCausalLM, AutoTokenizer,
                          BitsAndBytesConfig)

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.engine.hooks import (DatasetInfoHook, EvaluateChatHook,
                                 VarlenAttnArgsToMessageHubHook)
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = $pretrained_model_name_or_path
use_varlen_attn = False

# Data
alpaca_en_path = $alpaca_en_path
prompt_template = PROMPT_TEMPLATE.$prompt_template
max_length = $max_length
pack_to_max_length = $pack_to_max_length

# Scheduler & Optimizer
batch_size = $batch_size  # per_device
accumulative_counts = $accumulative_counts
dataloader_num_workers = 0
$length_line
optim_type = AdamW
lr = $lr
betas = (0.9, 0.999)
weight_decay = 0
max_norm = $max_norm  # grad clip
warmup_ratio = $warmup_ratio

# Save
save_steps = $save_steps  # the kit's save_steps $kit_save_steps x accumulative_counts
save_total_limit = $save_total_limit

# Evaluate the generation performance during the training
evaluation_freq = $evaluation_freq  # the kit's evaluation_freq $kit_evaluation_freq x accumulative_counts
SYSTEM = $SYSTEM
evaluation_inputs = $evaluation_inputs

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.float16,
$quantization    ),
    lora=dict(
        type=LoraConfig,
        r=$lora_r,
        lora_alpha=$lora_alpha,
        lora_dropout=$lora_dropout,
        target_modules=$target_modules,
        bias='none',
        task_type='CAUSAL_LM'))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
alpaca_en = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path='json', data_files=dict(train=alpaca_en_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=None,  # the data is already XTuner's 'conversation' format
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=alpaca_en,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(
        type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16')

# learning policy
# linear warm-up over warmup_ratio of the run, then cosine to 0 (the kit's schedule)
$param_scheduler
train_cfg = dict(type=TrainLoop, $length_name=$length_name)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
# the evaluation inputs answered every evaluation_freq iterations, as the kit's evaluation rounds
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template)
]

if use_varlen_attn:
    custom_hooks += [dict(type=VarlenAttnArgsToMessageHubHook)]

# configure default hooks
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    # print log every logging_steps updates (the kit's logging_steps $kit_logging_steps x accumulative_counts).
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=$logging_interval),
    param_scheduler=dict(type=ParamSchedulerHook),
    # an iter_N.pth every save_steps iterations, the last save_total_limit kept
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    # the sampler's seed in a run over several GPUs
    sampler_seed=dict(type=DistSamplerSeedHook),
)

# configure environment
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None

log_level = 'INFO'

load_from = None

resume = False

# the kit's seed; deterministic stays off, as in the course
randomness = dict(seed=$seed, deterministic=False)

log_processor = dict(by_epoch=False)
