"""`vitkit models`: the table's family and feature-stride columns come from the registry and feature_info."""

from vitkit.models.summary import format_table, model_row


def test_rows_give_family_native_size_and_strides():
    cnn = model_row("resnet18", flops=False)
    assert (cnn.family, cnn.img_size, cnn.strides, cnn.grid, cnn.tokens) == (
        "resnet",
        (224, 224),
        (4, 8, 16, 32),
        (7, 7),
        None,
    )
    vit = model_row("vit_nano_patch4_32", flops=False)
    assert (vit.family, vit.img_size, vit.strides, vit.grid, vit.tokens) == ("vit", (32, 32), (4,), (8, 8), 65)


def test_table_has_one_line_per_row_with_strides():
    rows = [model_row("resnet18", flops=False), model_row("vit_nano_patch4_32")]
    lines = format_table(rows).splitlines()
    assert lines[0].split("|")[1:-1] == [
        " model ",
        " family ",
        " params ",
        " GMACs ",
        " input ",
        " strides ",
        " grid ",
        " tokens ",
    ]
    assert "| resnet18 | resnet | 11.69M | - | 224x224 | 4,8,16,32 | 7x7 | - |" == lines[2]
    assert lines[3].startswith("| vit_nano_patch4_32 | vit | 1.33M | 0.08 | 32x32 | 4 | 8x8 | 65 |")


def test_params_are_counted_with_a_1000_class_head_for_every_name():
    """`vitkit models` promises 1000-class heads; the small-data hybrids default to 10 classes, and a 10-class count
    in that column would not compare with the others (192 * 990 + 990 more parameters for the tiny one)."""
    assert model_row("vit_hybrid_cnn_tiny_s4_32", flops=False).params == 2_745_850 + 192 * 990 + 990
