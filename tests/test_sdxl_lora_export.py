"""The exported SDXL LoRA files: the WebUI/kohya file is keyed as kohya's SDXL LoRAs are (the original UNet's
module names, which WebUI and ComfyUI map onto SDXL), and applied as they apply it, it reproduces the
trained LoRA UNet; the diffusers file loads with StableDiffusionXLPipeline.load_lora_weights."""


import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_export import base_unet, trained_lora_unet

from conftest import merge_webui_lora
from ddpo.lora import TARGET_MODULES
from tools.tiny_checkpoint import SDXL_CROSS_ATTENTION_DIM, SDXL_POOLED_DIM
from utils.checkpoint import CONFIGS
from utils.lora_files import save_lora
from utils.pipeline import load_pipeline

RANK = 4
SDXL_ATTENTION_LINEARS = 560  # 70 transformer blocks (down 2x1 + 2x10, mid 10, up 3x10 + 3x2) x 2 attentions x 4


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


def kohya_to_module(unet):
    """{kohya module name: Linear}, each name found the way the UIs find it."""
    by_path, blocks = attention_modules(unet), original_names(unet)
    mapped = {}
    for original, diffusers in blocks.items():
        for path, linear in by_path.items():
            if path.startswith(diffusers + "."):
                mapped["lora_unet_" + (original + path[len(diffusers):]).replace(".", "_")] = linear
    return mapped


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([901, 301]),
            torch.randn(2, 77, SDXL_CROSS_ATTENTION_DIM, generator=generator),
            {"text_embeds": torch.randn(2, SDXL_POOLED_DIM, generator=generator),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})


@torch.no_grad()
def output(unet):
    latents, timesteps, embeds, added = unet_inputs()
    return unet(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample


@pytest.fixture(scope="module", params=[RANK, 3 * RANK], ids=["alpha=rank", "alpha=3rank"])
def exported(request, tiny_sdxl_checkpoint, tmp_path_factory):
    """(lora_alpha, LoRA UNet output, diffusers file, ui file) of an SDXL LoRA saved as train_policy saves it."""
    lora_alpha = request.param
    unet = trained_lora_unet(tiny_sdxl_checkpoint, lora_alpha)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:  # values fp16 holds exactly: the file's fp16 then loses nothing, and any
                parameter.copy_(parameter.half().float())  # difference below is the mapping's or alpha's
    folder = str(tmp_path_factory.mktemp("sdxl_lora"))
    diffusers_path, ui_path = save_lora(unet.eval(), folder, epoch=3, family="sdxl")
    return lora_alpha, output(unet), diffusers_path, ui_path


def test_the_tiny_unet_has_exactly_sdxls_attention_layers(tiny_sdxl_checkpoint):
    with torch.device("meta"):
        real = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "sdxl" / "unet")))
    assert sum(p.numel() for p in real.parameters()) == pytest.approx(2.567e9, rel=1e-3)  # SDXL base's UNet
    tiny = base_unet(tiny_sdxl_checkpoint)
    assert set(attention_modules(tiny)) == set(attention_modules(real))
    assert len(attention_modules(real)) == SDXL_ATTENTION_LINEARS
    assert tiny.config.addition_embed_type == "text_time"


def test_ui_file_holds_three_fp16_keys_for_each_attention_layer_under_sdxls_original_names(exported,
                                                                                          tiny_sdxl_checkpoint):
    lora_alpha, _, _, ui_path = exported
    state = load_file(ui_path)
    linears = kohya_to_module(base_unet(tiny_sdxl_checkpoint))
    assert len(linears) == SDXL_ATTENTION_LINEARS and len(state) == 3 * SDXL_ATTENTION_LINEARS
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}
    assert modules == set(linears)
    # spelled out as they appear in kohya's SDXL LoRAs
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
            "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
            "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v",
            "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_q"} <= modules
    for module in modules:
        down, up, alpha = (state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"],
                           state[f"{module}.alpha"])
        assert down.shape == (RANK, linears[module].in_features)
        assert up.shape == (linears[module].out_features, RANK)
        assert alpha.shape == () and alpha.item() == lora_alpha
        assert {down.dtype, up.dtype, alpha.dtype} == {torch.float16}
    with safe_open(ui_path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_ui_file_applied_as_webui_does_reproduces_the_lora_unet(exported, tiny_sdxl_checkpoint):
    _, lora_output, _, ui_path = exported
    state = load_file(ui_path)
    unet = base_unet(tiny_sdxl_checkpoint)
    base_output = output(unet)
    merge_webui_lora(kohya_to_module(unet), state)
    effect = (lora_output - base_output).abs().max().item()
    assert effect > 1e-3, "the LoRA must change the output for this test to mean anything"
    # a wrong alpha, a missing or misplaced layer costs most of the effect; merged and unmerged differ by rounding
    assert (output(unet) - lora_output).abs().max().item() < effect / 1000


def test_diffusers_file_loads_with_sdxls_load_lora_weights_and_reproduces_the_lora_unet(exported,
                                                                                       tiny_sdxl_checkpoint):
    _, lora_output, diffusers_path, _ = exported
    pipeline = load_pipeline(tiny_sdxl_checkpoint, "cpu", torch.float32)
    base_output = output(pipeline.unet)
    pipeline.load_lora_weights(diffusers_path)
    effect = (lora_output - base_output).abs().max().item()
    assert effect > 1e-3
    assert (output(pipeline.unet) - lora_output).abs().max().item() < effect / 1000  # fp32: the same UNet
