//! Flag stage: the configured score against its calibrated threshold. An image is flagged
//! (`is_ood`) when its score is above the threshold or not finite; non-finite likelihoods get
//! `status = non_finite` so they are visible, never silently dropped.

use super::config::FlagConfig;
use super::score::ModelScorer;
use super::{PipelineError, Result};
use crate::score::calibration::Calibration;
use crate::score::{ImageScores, ScoreKind};

/// `status` column values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every likelihood is finite.
    Ok,
    /// Some likelihood is NaN or infinite.
    NonFinite,
}

impl Status {
    /// Column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NonFinite => "non_finite",
        }
    }
}

/// Outcome for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flag {
    /// Value of the configured score.
    pub score: f64,
    /// Score above threshold or not finite.
    pub is_ood: bool,
    /// Whether every likelihood was finite.
    pub status: Status,
}

/// The configured score and its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flagger {
    /// Which score.
    pub score: ScoreKind,
    /// Flag above this.
    pub threshold: f64,
}

impl Flagger {
    /// From a pipeline's flag section: a fixed threshold, or the threshold for the score in
    /// `cal`, the contents of its calibration file (which must belong to the models being used).
    ///
    /// Errors: a calibrated threshold without `cal`, a calibration of other models, a score it
    /// has no threshold for, a score needing a general model or reference the scorer lacks.
    pub fn from_config(
        c: &FlagConfig,
        cal: Option<&Calibration>,
        scorer: &ModelScorer,
    ) -> Result<Self> {
        if c.score.needs_general() && scorer.general_model_id().is_none() {
            return Err(PipelineError::Config(format!(
                "flag.score = \"{}\" needs a general model",
                c.score
            )));
        }
        if let Some(t) = c.threshold {
            return Ok(Self {
                score: c.score,
                threshold: t,
            });
        }
        let path = c
            .calibration
            .as_ref()
            .expect("validated: calibration or threshold");
        let cal = cal.ok_or_else(|| {
            PipelineError::Config(format!("calibration {} was not loaded", path.display()))
        })?;
        if c.score.needs_reference() && !scorer.has_reference() {
            return Err(PipelineError::Config(format!(
                "flag.score = \"{}\" needs a complexity reference and calibration {} has none; run `glowwatch calibrate --score {}`",
                c.score,
                path.display(),
                c.score
            )));
        }
        if cal.in_model != scorer.in_model_id() {
            return Err(PipelineError::Config(format!(
                "calibration {} belongs to model {}, the pipeline's in-distribution model is {}; run `glowwatch calibrate`",
                path.display(),
                cal.in_model,
                scorer.in_model_id()
            )));
        }
        if c.score.needs_general() && cal.general_model.as_deref() != scorer.general_model_id() {
            return Err(PipelineError::Config(format!(
                "calibration {} was made with general model {:?}, the pipeline uses {:?}",
                path.display(),
                cal.general_model,
                scorer.general_model_id()
            )));
        }
        let t = cal.thresholds.get(&c.score).ok_or_else(|| {
            PipelineError::Config(format!(
                "calibration {} has no threshold for score {} (it has: {})",
                path.display(),
                c.score,
                cal.thresholds
                    .keys()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        Ok(Self {
            score: c.score,
            threshold: t.threshold,
        })
    }

    /// Flags one image.
    pub fn flag(&self, s: &ImageScores) -> Flag {
        let finite = s.lp_in.iter().all(|v| v.is_finite())
            && s.lp_gen
                .as_ref()
                .is_none_or(|g| g.iter().all(|v| v.is_finite()));
        let score = self.score.value(s);
        Flag {
            score,
            is_ood: !score.is_finite() || score > self.threshold,
            status: if finite {
                Status::Ok
            } else {
                Status::NonFinite
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_and_non_finite() {
        let f = Flagger {
            score: ScoreKind::Nll,
            threshold: 10.0,
        };
        let s = |lp: f64| ImageScores::from_lp(vec![lp, 0.0], None, 4);
        assert!(!f.flag(&s(-10.0)).is_ood);
        assert!(f.flag(&s(-10.5)).is_ood);
        let nan = f.flag(&s(f64::NAN));
        assert!(nan.is_ood);
        assert_eq!(nan.status, Status::NonFinite);
        assert_eq!(f.flag(&s(-1.0)).status, Status::Ok);
    }
}
