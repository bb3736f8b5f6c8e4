//! Where [`super::DenseLinear`]'s kernels read the rows of x: a row-major matrix, or the
//! patches of a convolution read in place from its zero-bordered, channels-last image.

/// The rows of x: row `r` is `runs` runs of `run` values, the first at `start(r)` in `values`
/// and each `stride` values after the one before. A matrix row is one run. A convolution's
/// patch is one run per kernel row (a kernel row's window over every channel), so the kernel
/// reads the bordered image where it is instead of a copy of every patch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InputRows<'a> {
    values: &'a [f32],
    /// The row that is row 0 here (see [`InputRows::from`]).
    first: usize,
    starts: Starts,
    runs: usize,
    run: usize,
    stride: usize,
}

/// Where each row's first run starts.
#[derive(Debug, Clone, Copy)]
enum Starts {
    /// Row-major rows: row `r` at `r × run`.
    Matrix,
    /// Output pixel `r` (counted over all images): its window's top-left value.
    Patches {
        /// Output pixels per image.
        pixels: usize,
        /// Output pixels per output row.
        output_width: usize,
        /// Values between windows one output row apart.
        down: usize,
        /// Values between windows one output column apart.
        across: usize,
        /// Values per bordered image.
        image: usize,
    },
}

/// A convolution's windows over its bordered, channels-last images.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows {
    /// Runs per patch (the kernel's height), each `run` values long (its width × channels).
    pub runs: usize,
    pub run: usize,
    /// Values per bordered image row.
    pub image_row: usize,
    /// Values per bordered image.
    pub image: usize,
    /// The output's height and width.
    pub output: [usize; 2],
    /// Values between windows one output row and one output column apart.
    pub steps: [usize; 2],
}

impl<'a> InputRows<'a> {
    /// The rows of a row-major `[rows, depth]` matrix.
    pub(crate) fn matrix(values: &'a [f32], depth: usize) -> InputRows<'a> {
        InputRows {
            values,
            first: 0,
            starts: Starts::Matrix,
            runs: 1,
            run: depth,
            stride: depth,
        }
    }

    /// One patch per output pixel of `windows` over the bordered images `values`. Panics
    /// unless every window lies within its image and each starts after the one before (which
    /// the kernels' one bounds check, on the last row, relies on).
    pub(crate) fn patches(values: &'a [f32], windows: Windows) -> InputRows<'a> {
        let Windows {
            runs,
            run,
            image_row,
            image,
            output: [height, width],
            steps: [down, across],
        } = windows;
        assert!(runs > 0 && run > 0 && height > 0 && width > 0 && across > 0);
        let window = (runs - 1) * image_row + run;
        let last_in_row = (width - 1) * across;
        assert!(down > last_in_row && image >= (height - 1) * down + last_in_row + window);
        InputRows {
            values,
            first: 0,
            starts: Starts::Patches {
                pixels: height * width,
                output_width: width,
                down,
                across,
                image,
            },
            runs,
            run,
            stride: image_row,
        }
    }

    /// The rows from `first` on.
    pub(crate) fn from(self, first: usize) -> InputRows<'a> {
        InputRows {
            first: self.first + first,
            ..self
        }
    }

    /// Values per row.
    pub(crate) fn depth(&self) -> usize {
        self.runs * self.run
    }

    /// Runs per row, and values per run.
    pub(crate) fn runs(&self) -> (usize, usize) {
        (self.runs, self.run)
    }

    /// Panics unless `rows` rows are within the values. Since each row starts after the one
    /// before, checking the last is enough.
    pub(crate) fn check(&self, rows: usize) {
        if let Some(last) = rows.checked_sub(1) {
            let [start] = self.starts::<1>(last);
            let end = start + (self.runs - 1) * self.stride + self.run;
            assert!(end <= self.values.len(), "{rows} rows past the input");
        }
    }

    /// Where the first runs of rows `first..first + R` start.
    #[inline(always)]
    pub(crate) fn starts<const R: usize>(&self, first: usize) -> [usize; R] {
        let first = self.first + first;
        match self.starts {
            Starts::Matrix => std::array::from_fn(|r| (first + r) * self.run),
            Starts::Patches {
                pixels,
                output_width,
                down,
                across,
                image,
            } => {
                // One division for the block's first pixel, then a step per pixel: divisions
                // for every row cost a tenth of a 3×3 convolution over 32 channels.
                let (index, pixel) = (first / pixels, first % pixels);
                let mut image_start = index * image;
                let mut row_start = image_start + pixel / output_width * down;
                let mut x = pixel % output_width;
                let mut pixels_left = pixels - pixel;
                std::array::from_fn(|_| {
                    let start = row_start + x * across;
                    (x, pixels_left) = (x + 1, pixels_left - 1);
                    if pixels_left == 0 {
                        image_start += image;
                        (row_start, x, pixels_left) = (image_start, 0, pixels);
                    } else if x == output_width {
                        (row_start, x) = (row_start + down, 0);
                    }
                    start
                })
            }
        }
    }

    /// Run `k` of the row starting at `start` (from [`InputRows::starts`]).
    #[inline(always)]
    pub(crate) fn run(&self, start: usize, k: usize) -> &'a [f32] {
        &self.values[start + k * self.stride..][..self.run]
    }

    /// Where run `k` of the row starting at `start` begins.
    ///
    /// # Safety
    /// The row is among those [`InputRows::check`] passed.
    #[inline(always)]
    pub(crate) unsafe fn run_start(&self, start: usize, k: usize) -> *const f32 {
        // SAFETY: within the values (see above).
        unsafe { self.values.as_ptr().add(start + k * self.stride) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 × 3 output over 4 × 5 bordered images of 2 channels, stride 1 down and 2 across,
    /// 3 × 2 kernel: each patch is its window's values, and two images follow each other.
    #[test]
    fn patches_are_their_windows_read_in_place() {
        let (height, width, channels) = (4, 5, 2);
        let image = height * width * channels;
        let values: Vec<f32> = (0..2 * image).map(|v| v as f32).collect();
        let windows = Windows {
            runs: 3,
            run: 2 * channels,
            image_row: width * channels,
            image,
            output: [2, 2],
            steps: [width * channels, 2 * channels],
        };
        let patches = InputRows::patches(&values, windows);
        patches.check(8);
        let starts = patches.starts::<8>(0);
        // A block may begin anywhere: mid-row, mid-image.
        assert_eq!(patches.from(3).starts::<5>(0), starts[3..]);
        assert_eq!(patches.starts::<4>(1), starts[1..5]);
        for (row, &start) in starts.iter().enumerate() {
            let (index, pixel) = (row / 4, row % 4);
            let (y, x) = (pixel / 2, 2 * (pixel % 2));
            for k in 0..3 {
                let at = index * image + ((y + k) * width + x) * channels;
                assert_eq!(patches.run(start, k), &values[at..][..2 * channels]);
            }
        }
    }

    #[test]
    #[should_panic(expected = "past the input")]
    fn rows_past_the_input_are_refused() {
        InputRows::matrix(&[0.0; 10], 5).check(3);
    }

    #[test]
    #[should_panic(expected = "past the input")]
    fn rows_from_a_later_first_are_checked_where_they_are() {
        // Rows 1 and 2 of a 2-row matrix: the second is past the end.
        InputRows::matrix(&[0.0; 10], 5).from(1).check(2);
    }

    #[test]
    #[should_panic]
    fn overlapping_images_are_refused() {
        let windows = Windows {
            runs: 3,
            run: 3,
            image_row: 3,
            image: 6,
            output: [1, 1],
            steps: [3, 1],
        };
        InputRows::patches(&[0.0; 18], windows);
    }
}
