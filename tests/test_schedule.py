import torch
from diffusers import DDPMScheduler

from sodiff.schedule import add_noise, alphas_cumprod, eps_from_x0, interp_alpha, x0_from_eps
from tolerance import ELEMENTWISE, LAYER, assert_close


def sd21_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False)


def test_table_equals_diffusers():
    assert_close(alphas_cumprod(), sd21_scheduler().alphas_cumprod, ELEMENTWISE)


def test_eq6_equals_ddpm_x0_at_integer_steps():
    sched = sd21_scheduler()
    table = alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    for t in (0, 1, 250, 499, 750, 999):
        z_t = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(eps, t, z_t).pred_original_sample
        ours = x0_from_eps(z_t, eps, interp_alpha(table, torch.full((2,), float(t))))
        assert_close(ours, ref, LAYER, msg=f"t={t}")


def test_interpolation_exact_at_integers_and_continuous_between():
    table = alphas_cumprod()
    ints = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(interp_alpha(table, ints), table)
    # Continuity: approaching an integer from either side converges to the table value.
    for k in (10, 500, 998):
        for d in (1e-2, 1e-4):
            lo = interp_alpha(table, torch.tensor([k - d]))
            hi = interp_alpha(table, torch.tensor([k + d]))
            assert abs(lo - table[k]) < 2 * d * 1e-2 and abs(hi - table[k]) < 2 * d * 1e-2
    # Strictly between neighbours (the table is strictly decreasing).
    mid = interp_alpha(table, torch.tensor([10.5]))
    assert table[11] < mid < table[10]


def test_eq6_both_ways_invert():
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    alpha = interp_alpha(alphas_cumprod(), torch.tensor([10.0, 333.3, 900.0]))
    z_t = add_noise(z0, noise, alpha)
    # Inverting divides by sqrt(alpha) or sqrt(1 - alpha): z_t's rounding grows by as much.
    grow = float(1 / torch.minimum(alpha, 1 - alpha).sqrt().min())
    scale = grow * float(z_t.abs().max())
    assert_close(x0_from_eps(z_t, noise, alpha), z0, LAYER, scale=scale)
    assert_close(eps_from_x0(z_t, z0, alpha), noise, LAYER, scale=scale)


def test_interpolation_clamps_out_of_range():
    table = alphas_cumprod()
    assert interp_alpha(table, torch.tensor([-5.0])) == table[0]
    assert interp_alpha(table, torch.tensor([1500.0])) == table[-1]
