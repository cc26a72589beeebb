//! The residual add in f64: same name and argument order as [`crate::residual`].

pub fn residual_add(x: &mut [f64], delta: &[f64]) {
    for (x, d) in x.iter_mut().zip(delta) {
        *x += d;
    }
}

pub fn scale(x: &mut [f64], factor: f64) {
    for x in x.iter_mut() {
        *x *= factor;
    }
}
