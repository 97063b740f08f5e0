//! SDK errors as [`StoreError`]s.

use std::error::Error as StdError;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use idemgate_core::error::{ErrorKind, StoreError};

/// What a service error code means for idemgate (codes as DynamoDB documents them).
pub(crate) fn kind_of_code(code: &str, message: &str) -> Option<ErrorKind> {
    Some(match code {
        // Nothing was written; the table (or account) is over its rate right now. Not
        // "unreachable": the store answered, so never forward past it (`503 store-full`).
        "ProvisionedThroughputExceededException"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "ItemCollectionSizeLimitExceededException" => ErrorKind::Capacity,
        "ResourceNotFoundException"
        | "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "MissingAuthenticationToken"
        | "MissingAuthenticationTokenException"
        | "IncompleteSignature"
        | "ExpiredTokenException"
        | "InvalidClientTokenId" => ErrorKind::Config,
        // Another region is writing this item right now (a multi-region strongly consistent
        // table): the store answered and the key is in use, so this must never fail open.
        "ReplicatedWriteConflictException" | "TransactionConflictException" => ErrorKind::Capacity,
        "InternalServerError" | "ServiceUnavailable" => ErrorKind::Unavailable,
        "ValidationException" if is_item_too_large(message) => ErrorKind::Capacity,
        _ => return None,
    })
}

/// DynamoDB's refusals of an item over its size limit: "Item size has exceeded the maximum
/// allowed size" (PutItem) and "Item size to update has exceeded the maximum allowed size"
/// (UpdateItem).
pub(crate) fn is_item_too_large(message: &str) -> bool {
    message.contains("Item size") && message.contains("exceeded the maximum allowed size")
}

/// `e` and its sources, outermost first.
fn chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |&err| err.source())
}

/// The credential provider's error in `e`'s source chain, if any.
fn credentials_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a CredentialsError> {
    chain(e).find_map(|err| err.downcast_ref::<CredentialsError>())
}

/// The kind of a credential provider's failure.
fn credential_kind(e: &CredentialsError) -> (ErrorKind, String) {
    match e {
        CredentialsError::ProviderTimedOut(_)
        | CredentialsError::ProviderError(_)
        | CredentialsError::Unhandled(_) => (
            ErrorKind::Unavailable,
            "the credential provider failed (IMDS, STS or web identity)".to_owned(),
        ),
        _ => (
            ErrorKind::Config,
            "no usable AWS credentials (the credential chain found none, or its configuration \
             is invalid)"
                .to_owned(),
        ),
    }
}

/// Whether `e`'s source chain is a refused TLS certificate (rustls says "invalid peer
/// certificate"; an unknown issuer, an expired or mismatched certificate).
fn mentions_certificate(e: &(dyn StdError + 'static)) -> bool {
    chain(e).any(|err| err.to_string().to_ascii_lowercase().contains("certificate"))
}

/// Maps an SDK error of operation `op`.
pub(crate) fn sdk<E, R>(op: &'static str, e: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    // The credential provider runs inside the attempt (its failures arrive as dispatch
    // failures) or before it (construction failures). A transient one (IMDS, STS or web
    // identity slow or failing) is an outage; a missing or invalid configuration is a
    // misconfiguration.
    let (kind, detail) = match (&e, credentials_error(&e)) {
        (SdkError::TimeoutError(_), _) => (ErrorKind::Timeout, "no answer in time".to_owned()),
        (SdkError::DispatchFailure(d), _) if d.is_timeout() => {
            (ErrorKind::Timeout, "no answer in time".to_owned())
        }
        (SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_), Some(credentials)) => {
            credential_kind(credentials)
        }
        (SdkError::DispatchFailure(_), _) if mentions_certificate(&e) => (
            ErrorKind::Config,
            "TLS: the endpoint's certificate was refused (trust roots, host name)".to_owned(),
        ),
        (SdkError::DispatchFailure(_), _) => (ErrorKind::Unavailable, "not reachable".to_owned()),
        (SdkError::ResponseError(_), _) => (ErrorKind::Unavailable, "unreadable answer".to_owned()),
        (SdkError::ConstructionFailure(_), _) => (
            ErrorKind::Config,
            "the request could not be built (region, credentials or endpoint)".to_owned(),
        ),
        (SdkError::ServiceError(service), _) => {
            let err = service.err();
            let code = err.code().unwrap_or("");
            let message = err.message().unwrap_or("");
            if code == "ValidationException" && is_item_too_large(message) {
                return StoreError::value_too_large(format!(
                    "dynamodb {op}: the record would exceed DynamoDB's item size limit ({message})"
                ));
            }
            (
                kind_of_code(code, message).unwrap_or(ErrorKind::Internal),
                format!("{code}: {message}"),
            )
        }
        (_, _) => (ErrorKind::Internal, "unexpected SDK error".to_owned()),
    };
    StoreError::new(kind, format!("dynamodb {op}: {detail}")).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(source: CredentialsError) -> StoreError {
        use aws_smithy_runtime_api::client::result::ConnectorError;
        let e: SdkError<aws_sdk_dynamodb::operation::get_item::GetItemError, ()> =
            SdkError::dispatch_failure(ConnectorError::other(Box::new(source), None));
        sdk("GetItem", e)
    }

    #[test]
    fn credential_provider_failures_are_told_from_misconfiguration() {
        let transient = dispatch(CredentialsError::provider_error("IMDS said 500"));
        assert_eq!(transient.kind(), ErrorKind::Unavailable, "{transient}");
        let timed_out = dispatch(CredentialsError::provider_timed_out(
            std::time::Duration::from_secs(5),
        ));
        assert_eq!(timed_out.kind(), ErrorKind::Unavailable, "{timed_out}");
        let missing = dispatch(CredentialsError::not_loaded("no provider found"));
        assert_eq!(missing.kind(), ErrorKind::Config, "{missing}");
        // Even when the provider's message mentions a certificate.
        let cert = dispatch(CredentialsError::provider_error(
            "STS: invalid peer certificate",
        ));
        assert_eq!(cert.kind(), ErrorKind::Unavailable, "{cert}");
    }

    #[test]
    fn service_codes_map_to_stable_kinds() {
        assert_eq!(
            kind_of_code("ProvisionedThroughputExceededException", ""),
            Some(ErrorKind::Capacity)
        );
        assert_eq!(
            kind_of_code("ThrottlingException", ""),
            Some(ErrorKind::Capacity)
        );
        assert_eq!(
            kind_of_code("ResourceNotFoundException", "Requested resource not found"),
            Some(ErrorKind::Config)
        );
        assert_eq!(
            kind_of_code("UnrecognizedClientException", ""),
            Some(ErrorKind::Config)
        );
        assert_eq!(
            kind_of_code("InternalServerError", ""),
            Some(ErrorKind::Unavailable)
        );
        assert_eq!(kind_of_code("ValidationException", "bad expression"), None);
        // A concurrent writer in another region: never Unavailable (which may fail open).
        assert_eq!(
            kind_of_code("ReplicatedWriteConflictException", ""),
            Some(ErrorKind::Capacity)
        );
        assert!(is_item_too_large(
            "Item size has exceeded the maximum allowed size"
        ));
        assert!(is_item_too_large(
            "Item size to update has exceeded the maximum allowed size"
        ));
    }
}
