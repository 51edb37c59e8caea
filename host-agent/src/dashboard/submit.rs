//! The submit form, read into the same wire message `jobs submit` sends. As on the command line,
//! nothing is judged here that the relay judges (serial, kind, sections, times, values): a bad
//! job comes back rejected with the relay's reason. Only what the message cannot carry is an
//! error here (a line that is not SECTION.NAME=VALUE, a name given twice, a non-number).

use std::collections::BTreeMap;

use axum::extract::Multipart;
use protocol::host::SubmitJob;

use super::html::SubmitForm;
use crate::cli::parse_set;

/// The form's fields, and the uploaded image if one was chosen.
#[derive(Debug, Default)]
pub struct Posted {
    pub csrf: Option<String>,
    pub form: SubmitForm,
    /// `(file name, bytes)` of the `image` field, if a file was chosen.
    pub image: Option<(String, Vec<u8>)>,
}

/// Reads the multipart body. The image is read whole into memory; the route's body limit keeps
/// it within the relay's largest artifact.
pub async fn read(mut mp: Multipart) -> Result<Posted, String> {
    let mut p = Posted::default();
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| format!("the form did not arrive whole: {e}"))?
    {
        let name = field.name().unwrap_or("").to_owned();
        if name == "image" {
            let file_name = field.file_name().unwrap_or("").to_owned();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| format!("the image did not arrive whole: {e}"))?;
            if !bytes.is_empty() {
                p.image = Some((file_name, bytes.to_vec()));
            }
            continue;
        }
        let text = field
            .text()
            .await
            .map_err(|e| format!("field {name:?} did not arrive whole: {e}"))?;
        let f = &mut p.form;
        match name.as_str() {
            "csrf" => p.csrf = Some(text),
            "serial" => f.serial = text.trim().to_owned(),
            "kind" => f.kind = text.trim().to_owned(),
            "at" => f.at = text.trim().to_owned(),
            "deadline" => f.deadline = text.trim().to_owned(),
            "execute_at" => f.execute_at = text.trim().to_owned(),
            "sections" => f.sections.push(text),
            "values" => f.values = text,
            "merge" => f.merge = text,
            "artifact" => f.artifact = text.trim().to_owned(),
            "version" => f.version = text.trim().to_owned(),
            "max_attempts" => f.max_attempts = text.trim().to_owned(),
            "mode" => f.mode = text,
            "interval_secs" => f.interval_secs = text.trim().to_owned(),
            "calendar" => f.calendar = text,
            "moments" => f.moments.push(text),
            "conditions" => f.conditions = text,
            // Unknown fields are ignored, as an older page may still be open after an upgrade.
            _ => {}
        }
    }
    Ok(p)
}

fn opt(s: &str) -> Option<String> {
    (!s.trim().is_empty()).then(|| s.trim().to_owned())
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<Option<T>, String> {
    match opt(s) {
        None => Ok(None),
        Some(t) => t
            .parse()
            .map(Some)
            .map_err(|_| format!("{what} {t:?} is not a whole number")),
    }
}

/// The wire message for the form. Each kind takes only its own fields, so values left in a
/// hidden fieldset for another kind do not travel. `artifact` is the id or version to install
/// (an uploaded image's id, when the caller uploaded one).
pub fn into_job(f: &SubmitForm, artifact: Option<String>) -> Result<SubmitJob, String> {
    let mut job = SubmitJob {
        serial: f.serial.clone(),
        kind: f.kind.clone(),
        at: opt(&f.at),
        deadline: opt(&f.deadline),
        ..SubmitJob::default()
    };
    match f.kind.as_str() {
        "get-data" => job.sections = f.sections.clone(),
        "update-data" => {
            let mut values = BTreeMap::new();
            for line in lines(&f.values) {
                let (name, value) = parse_set(&line)?;
                if values.insert(name.clone(), value).is_some() {
                    return Err(format!("{name} is given twice; give each value once"));
                }
            }
            job.values = values;
            job.merge = opt(&f.merge);
        }
        "firmware" => {
            job.artifact = artifact.or_else(|| opt(&f.artifact));
            job.execute_at = opt(&f.execute_at);
            job.max_attempts = number(&f.max_attempts, "write attempts")?;
        }
        "set-schedule" => {
            job.mode = opt(&f.mode);
            job.interval_secs = number(&f.interval_secs, "interval")?;
            job.calendar = lines(&f.calendar);
            job.moments = f.moments.clone();
            job.conditions = lines(&f.conditions);
        }
        // An unknown kind goes to the relay, which records it as rejected with the reason.
        _ => {}
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::data::Value;

    #[test]
    fn each_kind_takes_its_own_fields() {
        let mut f = SubmitForm {
            serial: "C1".into(),
            kind: "update-data".into(),
            at: " ".into(),
            deadline: "2026-11-28T00:00:00Z".into(),
            sections: vec!["counters".into()],
            values: "adjustment.density=6\n\n  adjustment.toner_save=true \r\n".into(),
            merge: "device".into(),
            artifact: "2.1".into(),
            ..SubmitForm::default()
        };
        let job = into_job(&f, None).unwrap();
        assert_eq!(job.at, None);
        assert_eq!(job.deadline.as_deref(), Some("2026-11-28T00:00:00Z"));
        assert!(job.sections.is_empty(), "get-data's field must not travel");
        assert_eq!(job.artifact, None);
        assert_eq!(job.values["adjustment.density"], Value::Int(6));
        assert_eq!(job.values["adjustment.toner_save"], Value::Bool(true));
        assert_eq!(job.merge.as_deref(), Some("device"));

        f.values = "a.b=1\na.b=2".into();
        assert!(into_job(&f, None).unwrap_err().contains("twice"));
        f.values = "nonsense".into();
        assert!(
            into_job(&f, None)
                .unwrap_err()
                .contains("SECTION.NAME=VALUE")
        );

        f.kind = "firmware".into();
        f.max_attempts = "2".into();
        let job = into_job(&f, Some("ab".repeat(32))).unwrap();
        assert_eq!(job.artifact, Some("ab".repeat(32)), "the upload wins");
        assert_eq!(job.max_attempts, Some(2));
        assert_eq!(into_job(&f, None).unwrap().artifact.as_deref(), Some("2.1"));
        f.max_attempts = "two".into();
        assert!(into_job(&f, None).is_err());

        f.kind = "set-schedule".into();
        f.mode = "periodic".into();
        f.interval_secs = "900".into();
        f.calendar = "daily:22:00\n\nweekly:sun 02:00".into();
        f.moments = vec!["power-on".into()];
        let job = into_job(&f, None).unwrap();
        assert_eq!(job.interval_secs, Some(900));
        assert_eq!(job.calendar, ["daily:22:00", "weekly:sun 02:00"]);
        assert_eq!(job.moments, ["power-on"]);
        assert!(job.values.is_empty());

        f.kind = "get-data".into();
        assert_eq!(into_job(&f, None).unwrap().sections, ["counters"]);
    }
}
