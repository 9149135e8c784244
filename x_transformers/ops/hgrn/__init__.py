from x_transformers.ops.hgrn.naive import naive_hgrn


def hgrn_scan(x, g, initial_state=None, output_final_state=False, cu_seqlens=None):
    o, ht = naive_hgrn(x, g, initial_state, output_final_state, cu_seqlens)
    return o.to(x.dtype), ht


__all__ = ["hgrn_scan", "naive_hgrn"]
