"""The exported LoRA files: the WebUI/kohya file is exactly what WebUI and ComfyUI apply, and the diffusers
file loads with pipeline.load_lora_weights. Both reproduce the trained LoRA UNet's output."""

import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import merge_webui_lora
from ddpo.lora import TARGET_MODULES, add_lora
from utils.lora_files import save_lora
from utils.pipeline import load_pipeline

RANK = 4
SD15_ATTENTION_LINEARS = 128  # 16 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)


def base_unet(checkpoint):
    return UNet2DConditionModel.from_pretrained(os.path.join(checkpoint, "unet")).eval()


def attention_linears(unet):
    """{kohya module name: Linear} of the layers the LoRA targets, named as WebUI names them."""
    return {"lora_unet_" + name.replace(".", "_"): module for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in TARGET_MODULES))}


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([901, 301]),
            torch.randn(2, 77, 32, generator=generator))


@torch.no_grad()
def output(unet):
    latents, timesteps, embeds = unet_inputs()
    return unet(latents, timesteps, encoder_hidden_states=embeds).sample


def trained_lora_unet(checkpoint, lora_alpha):
    """A LoRA UNet as train_policy makes it (or, for lora_alpha != rank, with peft's API), with non-zero lora_B."""
    unet = base_unet(checkpoint)
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
    return unet.eval()


@pytest.fixture(scope="module", params=[RANK, 3 * RANK], ids=["alpha=rank", "alpha=3rank"])
def exported(request, tiny_checkpoint, tmp_path_factory):
    """(lora_alpha, LoRA UNet output, diffusers file, ui file) of a LoRA saved as train_policy saves it."""
    lora_alpha = request.param
    unet = trained_lora_unet(tiny_checkpoint, lora_alpha)
    folder = str(tmp_path_factory.mktemp("lora"))
    diffusers_path, ui_path = save_lora(unet, folder, epoch=7)
    assert diffusers_path == os.path.join(folder, "diffusers_lora_epoch_7.safetensors")
    assert ui_path == os.path.join(folder, "ui_lora_epoch_7.safetensors")
    assert sorted(os.listdir(folder)) == ["diffusers_lora_epoch_7.safetensors", "ui_lora_epoch_7.safetensors"]
    return lora_alpha, output(unet), diffusers_path, ui_path


def test_the_tiny_unet_has_sd15s_128_attention_linears(tiny_checkpoint):
    assert len(attention_linears(base_unet(tiny_checkpoint))) == SD15_ATTENTION_LINEARS


def test_ui_file_holds_exactly_three_fp16_keys_for_each_of_the_128_layers(exported, tiny_checkpoint):
    lora_alpha, _, _, ui_path = exported
    state = load_file(ui_path)
    linears = attention_linears(base_unet(tiny_checkpoint))
    assert len(state) == 3 * SD15_ATTENTION_LINEARS == 384
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}
    assert modules == set(linears)
    # spelled out as they appear in any SD1.5 LoRA that WebUI and ComfyUI load
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"} <= modules
    for module in modules:
        down, up, alpha = (state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"],
                           state[f"{module}.alpha"])
        linear = linears[module]
        assert down.shape == (RANK, linear.in_features)
        assert up.shape == (linear.out_features, RANK)
        assert alpha.shape == () and alpha.item() == lora_alpha
        assert {down.dtype, up.dtype, alpha.dtype} == {torch.float16}
        assert up.abs().max() > 0
    with safe_open(ui_path, "pt") as f:
        assert f.metadata().get("ss_network_module") == "networks.lora"


def test_ui_file_applied_as_webui_does_reproduces_the_lora_unet(exported, tiny_checkpoint):
    _, lora_output, _, ui_path = exported
    state = load_file(ui_path)
    unet = base_unet(tiny_checkpoint)
    base_output = output(unet)
    merge_webui_lora(attention_linears(unet), state)
    merged_output = output(unet)
    effect = (lora_output - base_output).abs().max().item()
    assert effect > 1e-3, "the LoRA must change the output for this test to mean anything"
    # the file's fp16 weights cost a little precision; a wrong alpha (x2 or /2) costs half the effect or more
    assert (merged_output - lora_output).abs().max().item() < effect / 20


def test_diffusers_file_loads_with_load_lora_weights_and_reproduces_the_lora_unet(exported, tiny_checkpoint):
    _, lora_output, diffusers_path, _ = exported
    pipeline = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    base_output = output(pipeline.unet)
    pipeline.load_lora_weights(diffusers_path)
    loaded_output = output(pipeline.unet)
    effect = (lora_output - base_output).abs().max().item()
    assert effect > 1e-3
    assert (loaded_output - lora_output).abs().max().item() < effect / 1000  # fp32 weights: the same UNet
