"""The exported LoRA files, for SD1.5 and SDXL: the WebUI/kohya file is keyed as kohya's LoRAs of the family are
(SD1.5: the diffusers module path; SDXL: the original UNet's module names, which WebUI and ComfyUI map onto
SDXL), and applied as WebUI and ComfyUI apply it, it reproduces the trained LoRA UNet; the diffusers file
loads with the pipeline's load_lora_weights and reproduces it too."""

import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import merge_webui_lora
from ddpo.lora import TARGET_MODULES, add_lora
from utils.checkpoint import CONFIGS
from utils.lora_files import save_lora
from utils.pipeline import load_pipeline

RANK = 4
# the real architecture's parameter count (SD1.5's and SDXL base's published UNet sizes)
REAL_UNET_PARAMETERS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
# modules spelled out as they appear in the family's LoRAs that WebUI and ComfyUI load
SPELLED_OUT = {
    "sd15": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
             "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"},
    "sdxl": {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
             "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
             "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v",
             "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_q"},
}
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version


def base_unet(checkpoint):
    return UNet2DConditionModel.from_pretrained(os.path.join(checkpoint, "unet")).eval()


def attention_modules(unet):
    """{diffusers module path: Linear} of the layers the LoRA targets."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in TARGET_MODULES))}


def original_names(unet):
    """{original (sgm) UNet path: diffusers path} of every attention block, enumerated block by block as
    ComfyUI's comfy.utils.unet_to_diffusers does; WebUI finds the same modules by replacing `lora_unet`
    with `diffusion_model` in a key (networks.py: "SDXL loras seem to already have correct compvis keys")."""
    names, layers = {}, unet.config.layers_per_block
    number = 1  # input block 0 is conv_in
    for block_index, block in enumerate(unet.down_blocks):
        for layer in range(layers):
            if getattr(block, "attentions", None):
                names[f"input_blocks.{number}.1"] = f"down_blocks.{block_index}.attentions.{layer}"
            number += 1
        number += 1  # the downsampler's input block (the last block's number is never reached)
    names["middle_block.1"] = "mid_block.attentions.0"
    number = 0
    for block_index, block in enumerate(unet.up_blocks):
        for layer in range(layers + 1):
            if getattr(block, "attentions", None):
                names[f"output_blocks.{number}.1"] = f"up_blocks.{block_index}.attentions.{layer}"
            number += 1
    return names


def kohya_linears(family, unet):
    """{kohya module name: Linear} of the layers the LoRA targets, each name found the way the UIs find it:
    SD1.5's is the diffusers path, SDXL's the original UNet's."""
    by_path = attention_modules(unet)
    if family.name == "sd15":
        return {"lora_unet_" + path.replace(".", "_"): linear for path, linear in by_path.items()}
    mapped = {}
    for original, diffusers in original_names(unet).items():
        for path, linear in by_path.items():
            if path.startswith(diffusers + "."):
                mapped["lora_unet_" + (original + path[len(diffusers):]).replace(".", "_")] = linear
    return mapped


@torch.no_grad()
def output(unet, family):
    """The UNet's prediction on the family's unet_inputs, in float64 (the UNet is cast in place). The fp16 file's
    weights and their merge are exact there: in fp32, rounding the merged (alpha / rank) * up @ down by one ulp
    moves the tiny SDXL UNet's output by about 1/300 of the LoRA's whole effect, which would hide a real error."""
    unet.double()
    inputs = {key: {k: v.double() for k, v in value.items()} if isinstance(value, dict)
              else value.double() if value.is_floating_point() else value
              for key, value in family.unet_inputs().items()}
    return unet(**inputs).sample


def trained_lora_unet(checkpoint, lora_alpha):
    """A LoRA UNet as train_policy makes it (or, for lora_alpha != rank, with peft's API), with non-zero lora_B.

    Its LoRA weights are values fp16 holds exactly: the file's fp16 then loses nothing, and any difference
    below is the key mapping's or alpha's."""
    unet = base_unet(checkpoint)
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same LoRA whatever ran before
    if lora_alpha == RANK:
        add_lora(unet, RANK)
    else:
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                    target_modules=TARGET_MODULES))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero, which would export an all-zero LoRA
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
            if "lora_" in name:
                parameter.copy_(parameter.half().float())
    return unet.eval()


@pytest.fixture(scope="module", params=[RANK, 3 * RANK], ids=["alpha=rank", "alpha=3rank"])
def exported(request, family, family_checkpoint, tmp_path_factory):
    """(lora_alpha, LoRA UNet output, diffusers file, ui file) of a LoRA saved as train_policy saves it."""
    lora_alpha = request.param
    unet = trained_lora_unet(family_checkpoint, lora_alpha)
    folder = str(tmp_path_factory.mktemp("lora"))
    diffusers_path, ui_path = save_lora(unet, folder, epoch=7, family=family.name)
    assert diffusers_path == os.path.join(folder, "diffusers_lora_epoch_7.safetensors")
    assert ui_path == os.path.join(folder, "ui_lora_epoch_7.safetensors")
    assert sorted(os.listdir(folder)) == ["diffusers_lora_epoch_7.safetensors", "ui_lora_epoch_7.safetensors"]
    return lora_alpha, output(unet, family), diffusers_path, ui_path


def test_the_tiny_unet_has_exactly_the_real_architectures_attention_layers(family, family_checkpoint):
    with torch.device("meta"):
        real = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / family.name / "unet")))
    assert sum(p.numel() for p in real.parameters()) == REAL_UNET_PARAMETERS[family.name]
    tiny = base_unet(family_checkpoint)
    assert set(attention_modules(tiny)) == set(attention_modules(real))
    assert len(attention_modules(real)) == family.attention_linears  # SD1.5: 16 blocks x 2 attentions x 4
    assert tiny.config.addition_embed_type == real.config.addition_embed_type == \
        ("text_time" if family.name == "sdxl" else None)


def test_ui_file_holds_three_fp16_keys_for_each_attention_layer_under_the_uis_names(exported, family,
                                                                                   family_checkpoint):
    lora_alpha, _, _, ui_path = exported
    state = load_file(ui_path)
    linears = kohya_linears(family, base_unet(family_checkpoint))
    assert len(linears) == family.attention_linears and len(state) == 3 * family.attention_linears
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}
    assert modules == set(linears)
    assert SPELLED_OUT[family.name] <= modules
    for module in modules:
        down, up, alpha = (state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"],
                           state[f"{module}.alpha"])
        assert down.shape == (RANK, linears[module].in_features)
        assert up.shape == (linears[module].out_features, RANK)
        assert alpha.shape == () and alpha.item() == lora_alpha
        assert {down.dtype, up.dtype, alpha.dtype} == {torch.float16}
        assert up.abs().max() > 0
    with safe_open(ui_path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_base_model_version"] == BASE_MODEL_VERSION[family.name]


def test_ui_file_applied_as_webui_does_reproduces_the_lora_unet(exported, family, family_checkpoint):
    _, lora_output, _, ui_path = exported
    state = load_file(ui_path)
    unet = base_unet(family_checkpoint)
    base_output = output(unet, family)
    merge_webui_lora(kohya_linears(family, unet), state)
    effect = (lora_output - base_output).abs().max().item()
    assert effect > 1e-3, "the LoRA must change the output for this test to mean anything"
    # a wrong alpha (x2 or /2), a missing or misplaced layer costs half the effect or more; merged and
    # unmerged differ by float64 rounding
    assert (output(unet, family) - lora_output).abs().max().item() < effect / 1000


def test_diffusers_file_loads_with_load_lora_weights_and_reproduces_the_lora_unet(exported, family,
                                                                                  family_checkpoint):
    _, lora_output, diffusers_path, _ = exported
    pipeline = load_pipeline(family_checkpoint, "cpu", torch.float32)
    assert isinstance(pipeline, family.pipeline_class)
    base_output = output(pipeline.unet, family)
    pipeline.load_lora_weights(diffusers_path)
    effect = (lora_output - base_output).abs().max().item()
    assert effect > 1e-3
    assert (output(pipeline.unet, family) - lora_output).abs().max().item() < effect / 1000  # fp32: the same UNet
